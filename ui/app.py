"""The metaseg viewer: drop a slice, a multi-frame DICOM, a series or a study's three sequences; see, adjust and take
away the segmentation.

    metaseg ui [--server URL]        # or: METASEG_SERVER=URL streamlit run ui/app.py

The server runs the model once per upload, once its inputs are complete (a drop in the main box is; sequences in
separate boxes are when the user presses Segment), and answers with the lesion probability of every slice (cached here
by upload digest). The viewer decodes the upload as the server does (ui.upload: metaseg.imageio.sequences), so that
what the server would refuse is refused here before it is sent, and shows each sequence the upload holds. It makes the
masks, the 3D lesion table, the lesion-score filter, the overlays and the whole series' mask files (NIfTI, DICOM SEG:
ui.series_files) from those probabilities with the server's own code: scrolling, the threshold, the lesion score, the
opacity, the sequence shown and the downloads ask the server nothing.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np
import streamlit as st

from metaseg.errors import TooLarge, UserError
from metaseg.imageio.limits import Limits
from metaseg.imageio.picture import to_png_bytes
from metaseg.imageio.volume import Volume
from metaseg.imageio.sequences import FIELDS
from ui import display, findings, model_card, series_files
from ui.client import DEFAULT_SERVER, Client, ServerError
from ui.findings import Findings
from ui.sample import sample
from ui.upload import FLAIR_FIELD, Upload, file_stem, server_limits

DIAMETER = "Longest axial diameter: across the lesion on its widest slice, edge to edge"
_KEEP = {"ttl": 3600, "show_spinner": False}  # with max_entries below: bounded, these describe patients' scans
TABLE_FORMAT = {
    "volume (mm³)": st.column_config.NumberColumn(format="%.1f"),
    "area (mm²)": st.column_config.NumberColumn(format="%.1f"),
    "diameter (mm)": st.column_config.NumberColumn(format="%.1f", help=f"{DIAMETER}. RANO-BM: measurable from 10 mm."),
    "diameter (px)": st.column_config.NumberColumn(format="%.1f", help=f"{DIAMETER}."),
    "score": st.column_config.NumberColumn(format="%.2f", help="The lesion's highest probability."),
    "status": st.column_config.TextColumn(help="Filtered: its score is under the lesion score; drawn pale, left out "
                                          "of the counts and the downloads."),
}


@dataclass(frozen=True)
class Decoded:
    """The upload decoded, and the slices of each of its sequences in gray (display.sequence_slices)."""

    volume: Volume
    gray: dict[str, list[np.ndarray]]


@st.cache_resource
def client(url: str) -> Client:
    return Client(url)


@st.cache_data(ttl=60, show_spinner=False)
def model_info(url: str) -> dict:
    return client(url).info()


@st.cache_data(ttl=30, show_spinner=False)
def server_health(url: str) -> dict:
    """Kept for half a minute, so that scrolling and thresholding send the server nothing at all."""
    return client(url).health()


# Arguments with a leading underscore are left out of the cache key (the digest stands for the upload, so a rerun
# does not hash it again). cache_resource hands out the cached object itself: nothing below changes it.
@st.cache_resource(max_entries=4, **_KEEP)
def decoded(digest: str, _upload: Upload, _limits: Limits) -> Decoded:
    """The upload decoded as the server decodes it, under the server's limits."""
    volume = _upload.volume(_limits)
    return Decoded(volume, display.sequence_slices(volume))


@st.cache_resource(max_entries=8, **_KEEP)
def probabilities(url: str, digest: str, model: str, _upload: Upload) -> tuple[np.ndarray, float]:
    """The server's uint8 lesion probabilities of every slice, and the seconds the request took; `model` (name and
    version) keys them too, so a server restarted with another model is asked again."""
    start = time.perf_counter()
    probability = client(url).probabilities(_upload.parts)
    probability.flags.writeable = False
    return probability, time.perf_counter() - start


@st.cache_resource(max_entries=8, **_KEEP)
def findings_at(digest: str, model: str, threshold: float, score: float, steps: str, _probability: np.ndarray,
                _volume: Volume) -> Findings:
    return findings.find(_probability, _volume, json.loads(steps), threshold, score)


def check_size(upload: Upload, info: dict) -> None:
    size, most = sum(len(data) for _, data in upload.files), info["input"]["limits"]["max_upload_bytes"]
    if size > most:
        raise TooLarge(f"The upload has {size / 2**20:.1f} MiB; the server takes at most {most / 2**20:.1f} MiB "
                       "in one request.")


# --- the upload ---------------------------------------------------------------------------------------------


def uploader_key(field: str) -> str:
    group = "uploads" if field == "file" else "sequence_uploads"
    return f"{field}-{st.session_state.setdefault(group, 0)}"


def take_upload(key: str) -> None:
    """The main box `key` changed. A browser may deliver a sequence box's change in the same rerun, whose callback
    has emptied the main box (a new key) already: the old box's change is then stale, and taking it would empty the
    sequence boxes the user just filled."""
    if key != uploader_key("file"):
        return
    files = st.session_state.get(key)
    st.session_state.upload = Upload.of((f.name, f.getvalue()) for f in files) if files else None
    st.session_state.sequence_uploads += 1  # empty sequence boxes: this upload replaces what they held


def take_sequences() -> None:
    """A sequence box changed: the user may still be choosing, so nothing is segmented until Segment is pressed."""
    st.session_state.uploads += 1  # an empty main box: the sequences replace what it held
    st.session_state.upload = None


def segment_sequences() -> None:
    given = {field: [(f.name, f.getvalue()) for f in st.session_state.get(uploader_key(field)) or ()]
             for field in FIELDS}
    st.session_state.upload = Upload.sequences(given)


def take_sample() -> None:
    st.session_state.upload = sample()
    st.session_state.uploads += 1  # fresh, empty uploaders: the sample replaces whatever was dropped there
    st.session_state.sequence_uploads += 1


def upload_panel(info: dict | None, niftis: int) -> None:
    """The main box, the sample, and the sequence boxes with their Segment button (open when `niftis` NIfTI files
    were dropped in the main box, where they do not belong, and while the boxes hold files). Each uploader states the
    server's own size limit."""
    most = info["input"]["limits"]["max_upload_bytes"] if info else None
    limit = {"max_upload_size": max(1, most // 2**20)} if most else {}
    in_all = f" The server takes up to {most / 2**20:.0f} MiB in all, every file together." if most else ""
    drop_col, sample_col = st.columns([5, 1], vertical_alignment="center")
    main_box = uploader_key("file")
    drop_col.file_uploader(
        "Drop a PNG, JPEG, TIFF, DICOM or NIfTI image, a multi-frame DICOM, all files of one series, or the three "
        "sequence series of a DICOM study", accept_multiple_files=True, key=main_box,
        on_change=take_upload, args=(main_box,), **limit,
        help="The server recognises the format from the content, so DICOM files without a suffix are fine; it takes "
        "three DICOM series as pre-contrast, FLAIR and post-contrast when their descriptions say so unambiguously. "
        f"NIfTI sequences go in the sequence boxes below, one file each.{in_all}",
    )
    sample_col.button("Try a sample", on_click=take_sample, help="A synthetic phantom slice: no patient data.")
    filled = any(st.session_state.get(uploader_key(field)) for field in FIELDS)
    title = "Sequences in separate files (pre-contrast, FLAIR, post-contrast)"
    with st.expander(title, expanded=bool(niftis) or filled):
        st.caption("The model was trained on all three sequences. Put each one's image, NIfTI or series files in its "
                   "box, then press Segment: FLAIR is required, a missing pre- or post-contrast is filled with FLAIR. "
                   f"They must share slices and size.{in_all}")
        given = {field: column.file_uploader(name, accept_multiple_files=True, key=uploader_key(field),
                                             on_change=take_sequences, **limit)
                 for column, (field, name) in zip(st.columns(3), FIELDS.items())}
        st.button("Segment", on_click=segment_sequences, disabled=not given[FLAIR_FIELD], type="primary",
                  help="Sends the sequences in the boxes to the server, once." if given[FLAIR_FIELD] else
                  "FLAIR is required: put its files in the FLAIR box first.")


def nifti_message(count: int) -> str:
    boxes = ", ".join(f"**{name}**" for name in FIELDS.values())
    return (f"These are {count} NIfTI files, and a NIfTI file holds one sequence, so the main box takes only one. "
            f"Put each in its box under **Sequences in separate files** below ({boxes}; FLAIR is required), then "
            "press Segment.")


# --- the server and the result ------------------------------------------------------------------------------


def server_panel(url: str) -> dict | None:
    """The sidebar: is the server up, which model does it run, and what does that model expect; /info, or None when
    the server cannot be asked."""
    st.sidebar.header("Server")
    st.sidebar.caption(url)
    try:
        health = server_health(url)
        info = model_info(url)
    except ServerError as err:
        st.sidebar.error(str(err))
        return None
    st.sidebar.success(model_card.server_state(health))
    st.sidebar.header("Model")
    st.sidebar.markdown(f"**{info['title']}**  \n`{info['model']}` {info['version']} · {info['architecture']}")
    spec = info["input"]
    channels = ", ".join(spec["channel_def"].values()) or f"{spec['channels']} channel(s)"
    st.sidebar.caption(
        f"Input: {channels}; a gray image is taken as FLAIR. Each slice is resized to "
        f"{spec['spatial_size']}×{spec['spatial_size']} for the network. Formats: {', '.join(spec['formats'])}; up "
        f"to {spec['limits']['max_upload_bytes'] / 2**20:.0f} MiB and {spec['limits']['max_frames']} slices in one "
        "upload."
    )
    if info["test_metrics"]:
        st.sidebar.markdown("**Measured on patients the model never saw**  \n"
                            + model_card.metrics_text(info["test_metrics"]))
    st.sidebar.caption(info["intended_use"])
    return info


def picked_lesion(table_key: str, found: Findings):
    """The lesion picked in the table, or None."""
    state = st.session_state.get(table_key)
    rows = list(state["selection"]["rows"]) if state else []
    return found.lesions[rows[0]] if rows and rows[0] < len(found.lesions) else None


def jump_to_picked_lesion(table_key: str, slider_key: str, found: Findings) -> None:
    """Move the slice slider to the lesion picked in the table (its widest slice), once per pick: the slider stays
    free afterwards. Runs before the slider is drawn, the only time its value may be set."""
    state = st.session_state.get(table_key)
    rows = list(state["selection"]["rows"]) if state else []
    if st.session_state.get("picked") == (table_key, rows):
        return
    st.session_state.picked = (table_key, rows)
    lesion = picked_lesion(table_key, found)
    if lesion is not None:
        st.session_state[slider_key] = lesion.diameter_slice + 1


def result(url: str, upload: Upload) -> None:
    """Controls, the slice and its overlay, the lesion table, and the downloads, for one upload."""
    try:
        info = model_info(url)
    except ServerError as err:
        st.error(str(err))
        return
    steps = info["inference_steps"]
    model = f"{info['model']} {info['version']}"
    try:
        check_size(upload, info)
        shown = decoded(upload.digest, upload, server_limits(info))
    except (ServerError, UserError) as err:
        st.error(str(err))
        return
    volume = shown.volume
    threshold_col, score_col, opacity_col, outline_col = st.columns([2, 2, 2, 1])
    threshold = round(threshold_col.slider(
        "Probability threshold", 0.05, 0.95, steps["threshold"], 0.05,
        help=f"A pixel is lesion where the model's probability reaches it (the model's chosen one: "
        f"{steps['threshold']}). Applied here to the server's probabilities: changing it asks the server nothing.",
    ), 2)
    score = round(score_col.slider(
        "Lesion score", 0.0, 1.0, float(steps["min_lesion_score"]), 0.01, disabled=not volume.is_volume,
        help=f"A lesion is kept where its highest probability (its score) reaches this (the model's chosen one: "
        f"{steps['min_lesion_score']:g}); the others are drawn pale, marked filtered in the table and left out of the "
        "counts and the downloads. Up to the threshold it filters nothing. For a volume only (a series, a "
        "multi-frame file, a NIfTI); changing it asks the server nothing.",
    ), 2)
    opacity = opacity_col.slider("Overlay opacity", 0.0, 1.0, 0.4, 0.05)
    outline = outline_col.toggle("Outline", value=True, help="Draw the lesion border in solid red.")
    try:
        with st.spinner("Segmenting…"):
            probability, seconds = probabilities(url, upload.digest, model, upload)
    except ServerError as err:
        st.error(str(err))
        return
    count = len(volume.frames)
    if probability.shape != (count, *volume.frames[0].shape):
        st.error(f"The server's probabilities ({'×'.join(map(str, probability.shape))}) do not fit the upload "
                 f"({count} slice(s) of {'×'.join(map(str, volume.frames[0].shape))}).")
        return
    found = findings_at(upload.digest, model, threshold, score, json.dumps(steps, sort_keys=True), probability,
                        volume)

    name, index, table_key = next(iter(shown.gray)), 0, f"lesions-{upload.digest}-{threshold}"
    if len(shown.gray) > 1:
        name = st.radio("Show", list(shown.gray), horizontal=True, key=f"view-{upload.digest}",
                        help="The sequences are the same slices: the lesions are the same on each.")
    gray = shown.gray[name]
    if count > 1:
        index = slice_picker(upload, found, table_key)

    where = f"slice {index + 1} of {count}" if count > 1 else "one slice"
    input_col, overlay_col, findings_col = st.columns([1, 1, 1.2])
    what = name if len(shown.gray) > 1 else upload.label
    input_col.image(gray[index], caption=f"Input: {what}, {where}", output_format="PNG", width="stretch")
    picked = picked_lesion(table_key, found)
    dimmed = found.lesion_mask(found.filtered, index) if found.filtered else None
    outlined = found.lesion_mask([picked.id], index) if picked else None
    blended = display.blend(gray[index], found.masks[index], opacity, outline, dimmed, outlined)
    legend = [f"Lesion in red, threshold {threshold}"]
    if found.filtered:
        legend.append(f"pale: under lesion score {score:g}")
    if picked:
        elsewhere = "" if index in picked.slices else " (not on this slice)"
        legend.append(f"yellow outline: lesion {picked.id}{elsewhere}")
    overlay_col.image(blended, caption="; ".join(legend), output_format="PNG", width="stretch")
    with findings_col:
        findings_panel(volume, found, index, info, seconds)
    if found.lesions:
        st.dataframe(findings.lesion_table(found, volume), hide_index=True, column_config=TABLE_FORMAT,
                     key=table_key, on_select="rerun", selection_mode="single-row")
    downloads(upload, volume, found, info, (threshold, score), index, blended)


def slice_picker(upload: Upload, found: Findings, table_key: str) -> int:
    """The slice slider, starting where the lesions are and moved by a pick in the lesion table, with the slices
    that hold lesion marked under it; the 0-based slice chosen."""
    count = len(found.masks)
    slider_key = f"slice-{upload.digest}"
    st.session_state.setdefault(slider_key, findings.start_slice(found) + 1)
    jump_to_picked_lesion(table_key, slider_key, found)
    index = st.slider("Slice", 1, count, key=slider_key, help="In series order (inferior to superior for DICOM).") - 1
    st.image(display.strip(found.masks.any(axis=(1, 2)), index), width="stretch")
    st.caption(f"Lesion on slices {findings.lesion_slices(found)} of {count} (red above; the dark mark is the "
               "slice shown). Pick a lesion in the table below to go to its widest slice and outline it in yellow.")
    return index


def findings_panel(volume: Volume, found: Findings, index: int, info: dict, seconds: float) -> None:
    """The headline numbers, and what they rest on (the lesion table follows under the images)."""
    with st.container(horizontal=True, gap="medium"):
        for label, value in findings.headline(found, volume, index).items():
            st.metric(label, value, width="content")
    if not found.lesions:
        st.caption("No lesion at this threshold.")
    st.caption(findings.steps_caption(found, volume))
    if volume.pixel_spacing_mm is None:
        st.caption(f"{volume.kind.upper()} carries no pixel size, so sizes are in pixels and voxels; DICOM and "
                   "NIfTI give mm and, for a series, mm³.")
    elif volume.is_volume and volume.voxel_mm3 is None:
        st.caption("The series gives no slice thickness, so volumes are in voxels.")
    given = findings.model_input(volume.sequences_given, info.get("one_channel_dice_loss"))
    st.caption(f"{given}. Segmented once by the server in {seconds:.1f} s (model `{info['model']}`); slices, "
               "threshold, lesion score, table and mask files are worked out here. Research use only; not for "
               "diagnostic purposes.")


def downloads(upload: Upload, volume: Volume, found: Findings, info: dict, chosen: tuple[float, float], index: int,
              blended: np.ndarray) -> None:
    """The shown slice's mask and overlay, and on request the whole series' mask files: all made here from the final
    masks shown (ui.series_files), so none asks the server again."""
    stem = file_stem(upload, volume)
    slice_stem = stem if len(volume.frames) == 1 else f"{stem}_slice{index + 1}"
    mask_col, overlay_col, series_col = st.columns(3)
    mask_col.download_button("Mask PNG", to_png_bytes(found.masks[index]), f"{slice_stem}_mask.png", "image/png",
                             on_click="ignore")
    overlay_col.download_button("Overlay PNG", lambda: display.png(blended), f"{slice_stem}_overlay.png",
                                "image/png", on_click="ignore")  # encoded on the click: an RGB PNG takes a while
    wanted = [("NIfTI mask", f"{stem}_mask.nii.gz", "application/gzip", series_files.nifti)]
    if volume.kind == "dicom":
        wanted.append(("DICOM SEG", f"{stem}_seg.dcm", "application/dicom",
                       lambda masks, source: series_files.seg(masks, source, info)))
    threshold, score = chosen
    settings = f"threshold {threshold}" + (f", lesion score {score:g}" if volume.is_volume else "")
    key = (upload.digest, chosen)
    prepared = st.session_state.get("series_files")
    if prepared is None or prepared[0] != key:
        what = " and ".join(label for label, *_ in wanted)
        if not series_col.button(f"Prepare {what}", key=f"prepare-{upload.digest}-{threshold}-{score}",
                                 help=f"Every slice's mask as shown ({settings}), made here: the server is not "
                                 "asked again."):
            return
        files = {}
        with series_col, st.spinner("Preparing…"):
            for label, _, _, make in wanted:
                try:
                    files[label] = make(found.masks, volume)
                except UserError as err:
                    files[label] = err
        prepared = st.session_state.series_files = (key, files)  # one upload's at a time: they may be large
    for label, name, mime, _ in wanted:
        answer = prepared[1][label]
        if isinstance(answer, UserError):
            series_col.warning(f"{label}: {answer}")
        else:
            series_col.download_button(label, answer, name, mime, on_click="ignore",
                                       help=f"Every slice's mask as shown ({settings}).")


def main() -> None:
    st.set_page_config(page_title="metaseg viewer", layout="wide")
    url = os.environ.get("METASEG_SERVER") or DEFAULT_SERVER
    info = server_panel(url)
    st.title("metaseg viewer")
    upload = st.session_state.get("upload")
    niftis = upload.nifti_files if upload is not None else 0
    upload_panel(info, niftis)
    if niftis:
        st.info(nifti_message(niftis))
    elif upload is None:
        st.info("Drop a file above, try the phantom sample, or put the sequences in their boxes and press Segment.")
    else:
        result(url, upload)


main()
