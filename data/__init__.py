"""Paired low-light data: datasets and layouts (data.datasets), the LightningDataModule
(data.datamodule), synthetic low-light degradation (data.degradation) and its CLI (data.make_synthetic).

Nothing is imported here, so the light modules (degradation, make_synthetic) load without torch or
Lightning.
"""
