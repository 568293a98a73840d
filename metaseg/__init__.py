"""metaseg: brain-MRI metastasis segmentation with MONAI Bundles (U-Net++ and Attention U-Net).

Packages by stage, as nnU-Net keeps them; a module imports from its own stage or from one below it, never above:

    core        errors, files, bundles (running a bundle, reading its configs), conventions
    imageio     decoding uploads: one module per format, the Volume type, a study's three sequences
    data        a Data folder or zip: discovery, ground truth, the patient split (datalist), the phantom
    inference   the engine, the inference steps after it, lesions, `metaseg predict`
    evaluation  metrics, run folders, out-of-fold predictions, selection of inference steps, reports, figures
    training    the bundle stages over a run folder (pipeline), cross-validation (cv)
    cli         the `metaseg` command

A module over 400 lines says why it is one module in a docstring line starting `lines:`; tests/test_layout.py
holds every module to both rules.
"""

__version__ = "0.1.0"
