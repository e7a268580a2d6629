"""Task families: one folder per family with its LightningModule, LightningDataModule and model loading."""
