"""Decode uploaded image bytes into 2D float32 slices; shared by the server and the CLI.

As nnU-Net's imageio, one module per format and what they share beside them: ``reader.decode`` (the format's
reader, by ``detect``), ``picture`` (PNG, JPEG, TIFF), ``dicom``, ``nifti``, ``limits``, ``base`` (errors, the channel
rule), ``volume`` (the Volume type), and ``sequences`` (a study's three sequences as one Volume). The conventions
below hold for every format.

``decode(files)`` takes one file, or several files that are the slices of one series. The format
is recognised from magic numbers, never from the (user-chosen) file name: PNG, JPEG, TIFF (also
multi-page), DICOM (Part 10 with 'DICM' at offset 128, or a bare dataset without preamble) in any
transfer syntax pydicom and the pylibjpeg plugins decode, and NIfTI-1 (.nii, .nii.gz). All files of
an upload must be of one kind and one frame size. ``to_nifti_bytes`` writes a mask stack back as
NIfTI-1 in the upload's geometry.

What a volume is
    One volume (``Volume.is_volume``: its lesions are 3D, metaseg.inference.lesions) is a DICOM series (several
    files sharing one SeriesInstanceUID, ordered by position), a multi-frame DICOM, a NIfTI, or one
    multi-page TIFF. Several PNG/JPEG/TIFF files uploaded together are unrelated slices, and so are
    several DICOM files without a SeriesInstanceUID: nothing says they are one series.

Conventions
-----------
Orientation
    Every frame is a (rows, cols) array as the image is displayed: row 0 is the top.
    PNG/JPEG/TIFF: as stored, with an EXIF/TIFF Orientation tag applied.
    DICOM: as stored (DICOM pixel rows are display rows). Several files are sorted by
    ImagePositionPatient projected on the slice normal (inferior to superior for axial
    slices), else by InstanceNumber, else kept in upload order.
    NIfTI: reoriented to the closest RAS+ axes (axis flips/permutations only, never resampled);
    frame k is the axial slice ``data[:, :, k]`` shown the way a DICOM viewer shows an axial
    slice (radiological view: anterior at the top, the patient's right on the image's left),
    i.e. ``slice.T[::-1, ::-1]``; frames run inferior to superior. An axial DICOM series and
    the NIfTI converted from it give the same frames.
Geometry
    ``Volume.affine`` maps a voxel index (frame, row, col, 1) to RAS+ millimetres where the source
    says where its pixels are: DICOM ImagePositionPatient/ImageOrientationPatient/PixelSpacing, with
    the step between frames from the first and last positions (else SliceThickness along the
    normal), or the NIfTI's own affine. ``to_nifti_bytes`` stores a mask stack in that geometry, laid
    out so that the reading convention above gives back its frames in series order (for a DICOM
    series, when its slices are axial as usually stored; else as any NIfTI of that geometry reads);
    without geometry, the pixel spacing and slice thickness where known, else 1 mm. A NIfTI's mask
    is on the upload's own voxels, as MONAI's Invertd and nnU-Net write predictions: its shape,
    voxel order and affine (``Volume.voxel_index`` keeps the reorientation, undone on writing; a
    degenerate affine is replaced by the voxel sizes).
Channels
    ``frames`` are one channel: of any 3- or 4-channel image (RGB, RGBA, palette expanded to RGBA,
    RGB/YBR DICOM, PALETTE COLOR DICOM, 3-sample TIFF) channel 1. The training slices are
    256x256x3 with channels (pre-contrast, FLAIR, post-contrast), so channel 1 is FLAIR; for a
    gray picture saved as RGB all channels are equal, so channel 1 is its gray value. Gray+alpha
    yields channel 0. ``sequences`` keeps channels 0-2 of such an image, (3, rows, cols), for the
    models that see all three sequences (None for a one-channel frame); ``inputs`` is what the
    network gets: the sequences where there are three, else the frame.
Intensities
    Native values as float32, never rescaled (the model's preprocessing normalises); 16-bit
    colour PNGs, which PIL would cut to 8 bits, are decoded with imagecodecs. DICOM gets
    its Modality LUT / RescaleSlope+Intercept (also from Enhanced DICOM functional groups);
    MONOCHROME1 is mirrored over the modality range of its stored bits so that bright means high
    signal, as in MONOCHROME2. NIfTI gets scl_slope/scl_inter.
Non-finite values
    NaN and +/-inf (e.g. NIfTI background written by registration tools) are replaced by 0 and
    the count is logged as a warning; they would otherwise poison intensity normalisation.
Limits
    See ``Limits``. Sizes come from headers (PNG/JPEG header, TIFF tags, DICOM Rows/Columns/
    NumberOfFrames/SamplesPerPixel/BitsAllocated, NIfTI dim/datatype, also of a .nii.gz before
    the rest is inflated) and are checked before any pixel is decoded, as a memory budget in
    bytes: frames x rows x columns x (samples x bytes per sample + two float32 copies, the frame
    and its probability map). gzip/deflate streams are inflated under a cap; JPEG/JPEG-LS/JPEG
    2000 codestreams inside DICOM must declare the Rows/Columns of their header; a DICOM file is
    parsed under an upload-wide cap on data elements, with values over 1 MiB read on use only.
Privacy and safety
    Nothing is written to disk. Only pixel, geometry and series-identity DICOM tags are read; no
    tag value is ever logged or put into an error message. Every problem with the input raises
    ``UserError`` with a one-line message naming the file; exceptions from third-party decoders
    are wrapped, and only around the decoder calls themselves.
"""
