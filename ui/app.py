"""The metaseg viewer: drop a slice, a multi-frame DICOM or a series; see, adjust and take away the segmentation.

    metaseg ui [--server URL]        # or: METASEG_SERVER=URL streamlit run ui/app.py

Every mask and number comes from the metaseg server; this script only decodes the input to show it and blends
the server's mask over it. Server answers are cached by upload digest and threshold (and slice), so going back
to a view asks the server nothing.
"""

from __future__ import annotations

import os

import numpy as np
import streamlit as st

from metaseg.errors import UserError
from metaseg.imageio import decode
from ui import display, findings
from ui.client import DEFAULT_SERVER, Client, Files, ServerError
from ui.sample import sample
from ui.upload import Upload

_KEEP = {"max_entries": 64, "ttl": 3600, "show_spinner": False}  # bounded: the answers describe patients' scans
TABLE_FORMAT = {
    "area (mm²)": st.column_config.NumberColumn(format="%.1f"),
    "max prob.": st.column_config.NumberColumn(format="%.2f"),
}


@st.cache_resource
def client(url: str) -> Client:
    return Client(url)


@st.cache_data(ttl=60, show_spinner=False)
def model_info(url: str) -> dict:
    return client(url).info()


# The `_files` argument is left out of the cache key (Streamlit skips leading-underscore arguments): the digest
# stands for it, so a rerun does not hash the whole upload again.
@st.cache_data(**_KEEP)
def segment(url: str, digest: str, threshold: float, _files: Files) -> dict:
    return client(url).segment(_files, threshold)


@st.cache_data(**_KEEP)
def mask(url: str, digest: str, threshold: float, index: int, _files: Files) -> bytes:
    return client(url).mask(_files, threshold, index)


@st.cache_data(**_KEEP)
def overlay(url: str, digest: str, threshold: float, index: int, _files: Files) -> bytes:
    return client(url).overlay(_files, threshold, index)


@st.cache_data(**_KEEP)
def dicom_seg(url: str, digest: str, threshold: float, _files: Files) -> bytes:
    return client(url).seg(_files, threshold)


@st.cache_data(max_entries=8, ttl=3600, show_spinner=False)
def gray_slices(digest: str, _files: Files) -> list[np.ndarray]:
    """The upload's slices in series order, as the server orders them, in gray for display."""
    return display.grayscale(decode(list(_files)).frames)


def uploader_key() -> str:
    return f"uploader-{st.session_state.setdefault('uploads', 0)}"


def take_upload() -> None:
    files = st.session_state[uploader_key()]
    st.session_state.upload = Upload.of((f.name, f.getvalue()) for f in files) if files else None


def take_sample() -> None:
    st.session_state.upload = sample()
    st.session_state.uploads += 1  # a fresh, empty uploader: the sample replaces whatever was dropped there


def server_panel(url: str) -> None:
    """The sidebar: is the server up, which model does it run, and what does that model expect."""
    st.sidebar.header("Server")
    st.sidebar.caption(url)
    try:
        health = client(url).health()
        info = model_info(url)
    except ServerError as err:
        st.sidebar.error(str(err))
        return
    st.sidebar.success(f"Up, model loaded: {health['busy']} of {health['capacity']} request slots in use")
    st.sidebar.header("Model")
    st.sidebar.markdown(f"**{info['title']}**  \n`{info['model']}` {info['version']} · {info['architecture']}")
    spec = info["input"]
    channels = ", ".join(spec["channel_def"].values()) or f"{spec['channels']} channel(s)"
    st.sidebar.caption(
        f"Input: {channels}, resized to {spec['spatial_size']}×{spec['spatial_size']} for the network; "
        f"{spec['channel_rule']}. Formats: {', '.join(spec['formats'])}; up to "
        f"{spec['limits']['max_upload_bytes'] / 2**20:.0f} MiB and {spec['limits']['max_frames']} slices."
    )
    if info["test_metrics"]:
        st.sidebar.markdown("**Metrics on unseen patients**  \n" + "  \n".join(
            f"{name}: {value:.3f}" for name, value in info["test_metrics"].items()
        ))
    st.sidebar.caption(info["intended_use"])


def result(url: str, upload: Upload) -> None:
    """Controls, the slice and its overlay, the findings, and the downloads, for one upload."""
    threshold_col, opacity_col, outline_col = st.columns([2, 2, 1])
    try:
        chosen = model_info(url)["inference_steps"]["threshold"]  # cross-validated; the slider starts there
    except ServerError:
        chosen = 0.5  # no answer: the request below shows the error
    threshold = round(threshold_col.slider(
        "Probability threshold", 0.05, 0.95, chosen, 0.05,
        help=f"Sent to the server: a pixel is lesion where the model's probability reaches it (chosen: {chosen}).",
    ), 2)
    opacity = opacity_col.slider("Overlay opacity", 0.0, 1.0, 0.4, 0.05)
    outline = outline_col.toggle("Outline", value=True, help="Draw the lesion border in solid red.")
    try:
        with st.spinner("Segmenting…"):
            report = segment(url, upload.digest, threshold, upload.files)
            grays = gray_slices(upload.digest, upload.files)
    except (ServerError, UserError) as err:
        st.error(str(err))
        return

    count = report["slices"]
    index = 0
    if count > 1:
        key = f"slice-{upload.digest}"
        st.session_state.setdefault(key, findings.busiest_slice(report) + 1)  # start where the lesions are
        index = st.slider("Slice", 1, count, key=key, help="In series order (inferior to superior for DICOM).") - 1
    try:
        mask_png = mask(url, upload.digest, threshold, index, upload.files)
    except ServerError as err:
        st.error(str(err))
        return

    where = f"slice {index + 1} of {count}" if count > 1 else "one slice"
    input_col, overlay_col, findings_col = st.columns([1, 1, 1.3])
    input_col.image(grays[index], caption=f"Input: {upload.label}, {where}", output_format="PNG", width="stretch")
    blended = display.blend(grays[index], display.read_mask(mask_png), opacity, outline)
    overlay_col.image(blended, caption=f"Lesion in red, threshold {threshold}", output_format="PNG", width="stretch")
    with findings_col:
        with st.container(horizontal=True, gap="medium"):
            for label, value in findings.headline(report).items():
                st.metric(label, value, width="content")
        st.dataframe(findings.lesion_table(report), hide_index=True, column_config=TABLE_FORMAT)
        if report["pixel_spacing_mm"] is None:
            st.caption(f"{report['kind'].upper()} carries no pixel size, so sizes are in pixels; "
                       "DICOM gives mm² and, for a series, the volume in mL.")
        st.caption(f"{findings.model_input(report)}. Model `{report['model']}`. "
                   "Research use only; not for diagnostic purposes.")
    downloads(url, upload, report, threshold, index, mask_png)


def downloads(url: str, upload: Upload, report: dict, threshold: float, index: int, mask_png: bytes) -> None:
    """Mask and overlay of the shown slice, and the DICOM SEG of every slice; fetched after the view is drawn."""
    stem = upload.stem if report["slices"] == 1 else f"{upload.stem}_slice{index + 1}"
    mask_col, overlay_col, seg_col = st.columns(3)
    mask_col.download_button("Mask PNG", mask_png, f"{stem}_mask.png", "image/png", on_click="ignore")
    try:
        overlay_png = overlay(url, upload.digest, threshold, index, upload.files)
        overlay_col.download_button("Overlay PNG", overlay_png, f"{stem}_overlay.png", "image/png", on_click="ignore")
    except ServerError as err:
        overlay_col.warning(str(err))
    if report["kind"] != "dicom":
        return
    try:
        seg = dicom_seg(url, upload.digest, threshold, upload.files)
        seg_col.download_button("DICOM SEG", seg, f"{upload.stem}_seg.dcm", "application/dicom", on_click="ignore",
                                help="All slices, referencing the uploaded instances; opens in PACS viewers.")
    except ServerError as err:
        seg_col.warning(str(err))


def main() -> None:
    st.set_page_config(page_title="metaseg viewer", layout="wide")
    url = os.environ.get("METASEG_SERVER") or DEFAULT_SERVER
    server_panel(url)
    st.title("metaseg viewer")
    drop_col, sample_col = st.columns([5, 1], vertical_alignment="center")
    drop_col.file_uploader(
        "Drop a PNG, JPEG, TIFF or DICOM slice, a multi-frame DICOM, or all files of one series",
        accept_multiple_files=True, key=uploader_key(), on_change=take_upload,
        help="The server recognises the format from the content, so DICOM files without a suffix are fine.",
    )
    sample_col.button("Try a sample", on_click=take_sample, help="A synthetic phantom slice: no patient data.")
    upload = st.session_state.get("upload")
    if upload is None:
        st.info("Drop a file above, or try the phantom sample.")
        return
    result(url, upload)


main()
