//! Hyper-parameters of a Llama-family model, read from GGUF metadata.
