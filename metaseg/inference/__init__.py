"""The inference stage: a bundle's network on slices held in memory (`engine`), the inference steps after it
(`steps`), what a lesion is (`lesions`), and `metaseg predict` over a folder or zip (`predict`)."""
