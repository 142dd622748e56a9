"""switchkit.trainer: Lightning switcher module, datamodule, strategies and export."""
