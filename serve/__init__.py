"""metaseg's HTTP server: a FastAPI app that segments uploaded MRI slices with one MONAI bundle, loaded once."""
