"""What the engines share: `draw` (the per-request stream and the distribution a token is drawn from: torch engine,
vLLM's logits processor, SJD) and `rows` (the model's rows on a preallocated KV cache: torch engine and SJD)."""
