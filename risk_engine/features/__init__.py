"""Features: velocity windows, named lists and, later, profiles."""
