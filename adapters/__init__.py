"""Framework adapters. Each module imports only its own framework."""
