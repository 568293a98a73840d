"""metaseg: brain-MRI metastasis segmentation with MONAI Bundles (U-Net++ and Attention U-Net)."""

__version__ = "0.1.0"
