"""switchkit.distill: Lightning SFT of the aligned model on switch-generation outputs."""
