"""The engine: compiled steps, generation loops, batching and the loaded-model cache."""
