"""The pruning engine: configuration, presets, the module step and the layer loop."""
