"""Text conditioning: prompt parsing, tokenization (CLIP-L, CLIP-G, T5) and the encoders' assembled output."""
