"""Reading models and writing the output folder."""
