"""Float64 NumPy references for the normalization family. No framework imports here."""
