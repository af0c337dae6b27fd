//! GGUF reader and writer (versions 2 and 3).
