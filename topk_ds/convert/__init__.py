"""Offline conversion of training checkpoints to Hugging Face directories, and `load()`, the one
function that opens either for evaluation and analysis."""
