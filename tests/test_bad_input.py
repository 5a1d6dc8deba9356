"""The catalogue of bad input: each case stops with a message whose first line names the cause, or
is counted where the data is expected to be imperfect, and nothing already computed is lost or
left half-written for a later stage to trust. (More cases live beside the code they test:
test_config.py for params, test_resume.py for killed training, test_tracking.py for the store.)"""

import json
import socket
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from workspace import serve

from selfperceptual.pipeline.cli import main
from selfperceptual.pipeline.config import ParamsError, load_params
from selfperceptual.pipeline.data.shards import iter_samples


def stage(capsys, repo, name, out, *arguments, params=None, scale="smoke"):
    """Runs a stage's entry point as the CLI does; returns (exit status, first line of its error)."""
    argv = [name, "--params", str(params or repo / "params.yaml"), "--scale", scale, "--out", str(out), *map(str, arguments)]
    try:
        code = main(argv)
    except SystemExit as stop:  # a stage's clear error: Python prints it and exits 1
        code, message = (1, str(stop.code)) if isinstance(stop.code, str) else (stop.code, "")
    else:  # the command line's own message: its "error: " line (progress bars and logs come before it)
        message = next((line.removeprefix("error: ") for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")), "")
    return code, message.strip().splitlines()[0] if message.strip() else ""


def assert_nothing_written(out):
    assert not out.exists(), f"{out} was written"
    assert not list(out.parent.glob(f".{out.name}.*partial")), "a temporary folder was left behind"


# Params files ---------------------------------------------------------------------------------


@pytest.fixture
def params_copy(repo, tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((repo / "params.yaml").read_text())
    return path


def _edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_invalid_yaml_names_the_file_line_and_column(params_copy):
    _edit(params_copy, "  filter: {min_aesthetic: 6.0, min_side: 32}", "  filter: {min_aesthetic: 6.0, min_side: 32")
    with pytest.raises(ParamsError) as error:
        load_params(params_copy)
    first = str(error.value).splitlines()[0]
    line = next(i for i, text in enumerate(params_copy.read_text().splitlines(), 1) if "min_side: 32" in text and "}" not in text)
    assert first.startswith(f"{params_copy}:") and "invalid YAML" in first
    assert int(first.split(":")[1]) >= line


def test_a_duplicate_key_is_refused_with_its_line(params_copy):
    _edit(params_copy, "  filter: {min_aesthetic: 6.0, min_side: 32}", "  filter: {min_aesthetic: 6.0, min_side: 32, min_side: 8}")
    with pytest.raises(ParamsError, match=r":\d+:\d+: invalid YAML: duplicate key 'min_side'"):
        load_params(params_copy)


def test_an_exponent_without_a_dot_says_how_to_write_it(params_copy):
    _edit(params_copy, "condition_dropout: 0.1, learning_rate: 1.0e-3}", "condition_dropout: 0.1, learning_rate: 1e-3}")
    with pytest.raises(ParamsError, match=r"smoke\.train\.mse\.learning_rate: '1e-3' is a string to YAML; write it with a dot"):
        load_params(params_copy, "smoke")


def test_set_without_equals_sign_says_key_equals_value(repo):
    with pytest.raises(ParamsError, match=r"^--set train\.sp\.layer: expected KEY=VALUE"):
        load_params(repo / "params.yaml", "smoke", ["train.sp.layer"])


def test_a_missing_params_file_exits_2_naming_it(capsys, repo, tmp_path):
    code, first = stage(capsys, repo, "corpus", tmp_path / "corpus", params=tmp_path / "nowhere.yaml")
    assert code == 2 and first == f"params file not found: {tmp_path / 'nowhere.yaml'}"
    assert_nothing_written(tmp_path / "corpus")


@pytest.mark.parametrize(("old", "new", "cause"), [
    ("  filter: {min_aesthetic: 6.0,", "  filter: {min_aesthetic: 6.0, min_aesthetik: 5.0,", "smoke.filter.min_aesthetik: unknown key"),
    ("  filter: {min_aesthetic: 6.0,", "  filter: {min_aesthetic: high,", "smoke.filter.min_aesthetic: Input should be a valid number"),
    ("    ema_decay: 0.9\n", "    ema_decay: 1.5\n", "smoke.train.ema_decay: Input should be less than 1"),
])
def test_a_bad_params_file_exits_2_naming_the_key_before_any_work(capsys, repo, params_copy, tmp_path, old, new, cause):
    _edit(params_copy, old, new)
    code, first = stage(capsys, repo, "corpus", tmp_path / "corpus", params=params_copy)
    assert code == 2 and first.startswith(f"invalid {params_copy}: {cause}"), first
    assert_nothing_written(tmp_path / "corpus")


def test_a_bad_override_exits_2_before_any_work(capsys, repo, tmp_path):
    code, first = stage(capsys, repo, "corpus", tmp_path / "corpus", "--set", "corpus.num_train_rows=-5")
    assert code == 2 and first.startswith("invalid --set: smoke.corpus.num_train_rows:")
    assert_nothing_written(tmp_path / "corpus")


# Metadata -------------------------------------------------------------------------------------

ROW = {"URL": "images/000000.jpg", "TEXT": "a red circle", "WIDTH": 64, "HEIGHT": 64, "AESTHETIC_SCORE": 7.0,
       "punsafe": 0.01, "pwatermark": 0.1}


def _corpus(tmp_path, rows):
    folder = tmp_path / "corpus"
    folder.mkdir()
    pd.DataFrame(rows).to_parquet(folder / "laion.parquet", index=False)
    return folder


def test_metadata_without_a_column_stops_the_filter_naming_it(capsys, repo, tmp_path):
    corpus = _corpus(tmp_path, [{k: v for k, v in ROW.items() if k != "AESTHETIC_SCORE"}])
    code, first = stage(capsys, repo, "filter", tmp_path / "filter", "--corpus", corpus)
    assert code == 1 and "missing column(s) AESTHETIC_SCORE" in first and "laion.parquet" in first
    assert_nothing_written(tmp_path / "filter")


def test_metadata_with_text_where_numbers_belong_names_the_column(capsys, repo, tmp_path):
    corpus = _corpus(tmp_path, [{**ROW, "WIDTH": "64px"}])
    code, first = stage(capsys, repo, "filter", tmp_path / "filter", "--corpus", corpus)
    assert code == 1 and "column WIDTH must be numeric" in first
    assert_nothing_written(tmp_path / "filter")


def test_captions_that_are_bytes_not_text_are_refused_naming_the_row(capsys, repo, tmp_path):
    corpus = _corpus(tmp_path, [{**ROW, "TEXT": b"caf\xe9 \xff"}, ROW])  # a binary column, as some scrapers write
    code, first = stage(capsys, repo, "filter", tmp_path / "filter", "--corpus", corpus)
    assert code == 1 and "column TEXT must hold text; row 0 holds bytes" in first and "decode" in first
    assert_nothing_written(tmp_path / "filter")


def test_null_captions_and_urls_are_dropped_and_counted(capsys, repo, tmp_path):
    corpus = _corpus(tmp_path, [ROW, {**ROW, "TEXT": None}, {**ROW, "URL": None}, ROW])
    code, _ = stage(capsys, repo, "filter", tmp_path / "filter", "--corpus", corpus)
    assert code == 0
    stats = json.loads((tmp_path / "filter" / "stats.json").read_text())
    assert stats["rows_kept"] == 2 and stats["removed_by"]["missing_url_or_text"] == 2


def test_a_filter_that_keeps_nothing_says_which_condition_removed_the_rows(capsys, repo, tmp_path):
    corpus = _corpus(tmp_path, [{**ROW, "AESTHETIC_SCORE": 4.0}])
    code, first = stage(capsys, repo, "filter", tmp_path / "filter", "--corpus", corpus)
    assert code == 1 and first.startswith("filter: no rows pass") and "'aesthetic': 1" in first
    assert_nothing_written(tmp_path / "filter")


def test_download_fails_when_its_shards_hold_nothing_it_reported_fetched(capsys, repo, tmp_path):
    """Bytes captions that bypass the filter: img2dataset counts the rows fetched, but cannot
    write them; the stage checks its shards and refuses to hand on an empty dataset."""
    image = tmp_path / "red.jpg"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    (tmp_path / "filter").mkdir()
    pd.DataFrame([{**ROW, "URL": image.as_uri(), "TEXT": b"\xff\xfe bad"}]).to_parquet(tmp_path / "filter" / "kept.parquet")
    code, first = stage(capsys, repo, "download", tmp_path / "download", "--filtered", tmp_path / "filter", "--corpus", tmp_path,
                        "--set", "download.url_schemes=[file]")
    assert code == 1 and first.startswith("download: the shards hold no sample")
    assert_nothing_written(tmp_path / "download")


def test_metadata_from_outside_cannot_make_the_download_read_local_files(capsys, repo, tmp_path):
    """A LAION parquet (not the synthetic corpus) with file:// URLs and bare paths beside web ones:
    only http and https are fetched; the others are refused and counted, never read. When every row
    is refused the stage says so and writes nothing; download.url_schemes allows others explicitly."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(images / "red.jpg")
    (tmp_path / "filter").mkdir()
    with serve(images) as url:
        rows = [{**ROW, "URL": f"{url}/red.jpg", "TEXT": "web"}, {**ROW, "URL": (images / "red.jpg").as_uri(), "TEXT": "file"},
                {**ROW, "URL": "images/red.jpg", "TEXT": "path"}, {**ROW, "URL": "FILE:///etc/passwd", "TEXT": "upper"}]
        pd.DataFrame(rows).to_parquet(tmp_path / "filter" / "kept.parquet")
        code, _ = stage(capsys, repo, "download", tmp_path / "download", "--filtered", tmp_path / "filter", "--corpus", tmp_path)
    assert code == 0
    stats = json.loads((tmp_path / "download" / "stats.json").read_text())
    assert stats["refused"] == {"file": 2, "a local path": 1} and stats["count"] == 1
    assert [caption for _, _, caption in iter_samples([tmp_path / "download"])] == ["web"]

    pd.DataFrame(rows[1:]).to_parquet(tmp_path / "filter" / "kept.parquet")
    code, first = stage(capsys, repo, "download", tmp_path / "refused", "--filtered", tmp_path / "filter", "--corpus", tmp_path)
    assert code == 1 and first.startswith("download: every row of") and "{'file': 2, 'a local path': 1}" in first
    assert_nothing_written(tmp_path / "refused")
    code, _ = stage(capsys, repo, "download", tmp_path / "allowed", "--filtered", tmp_path / "filter", "--corpus", tmp_path,
                    "--set", "download.url_schemes=[file]")
    assert code == 0 and json.loads((tmp_path / "allowed" / "stats.json").read_text())["refused"] == {"a local path": 1}


# Images and the network, fetched by one real download ------------------------------------------


@contextmanager
def _servers(folder):
    """A file server, a port that refuses connections, and a server that accepts and never answers."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused_port = closed.getsockname()[1]
    closed.close()
    try:
        with serve(folder) as files:
            yield files, f"http://127.0.0.1:{refused_port}", f"http://127.0.0.1:{silent.getsockname()[1]}"
    finally:
        silent.close()


def _bad_images(folder):
    """name -> file of each image case (written under ``folder``)."""
    folder.mkdir()
    Image.new("RGB", (64, 48), (30, 160, 60)).save(folder / "good.jpg")
    Image.new("RGB", (64, 48), (30, 60, 160)).save(folder / "truncated.jpg")
    (folder / "truncated.jpg").write_bytes((folder / "truncated.jpg").read_bytes()[:200])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("<html>not an image</html>")
    Image.new("L", (64, 64), 128).save(folder / "gray.png")
    Image.new("CMYK", (64, 64), (0, 200, 200, 0)).save(folder / "cmyk.jpg")
    Image.new("RGB", (6000, 6000), (250, 250, 0)).save(folder / "huge.png")
    Image.new("RGB", (1, 1), (0, 0, 0)).save(folder / "tiny.png")
    for name, (image, suffix) in _pictures().items():
        if name == "rgb16" or name == "rgba16":  # PIL writes no 16-bit colour PNG; OpenCV does (BGR order)
            import cv2

            cv2.imwrite(str(folder / f"{name}.png"), np.asarray(image)[..., [2, 1, 0, 3][: np.asarray(image).shape[-1]]])
        else:
            image.save(folder / f"{name}.{suffix}")
    return {path.stem: path for path in folder.iterdir()}


SPLIT = np.zeros((64, 64, 3), np.uint8)  # a picture, not a flat colour: red and blue halves, a green square
SPLIT[:, :32], SPLIT[:, 32:], SPLIT[16:48, 16:48] = (200, 30, 30), (30, 30, 200), (30, 200, 30)


def _pictures():
    """name -> (the picture in another mode or depth, file suffix); each shows ``SPLIT`` (in gray for gray modes)."""
    rgb = Image.fromarray(SPLIT)
    gray16 = np.asarray(rgb.convert("L")).astype(np.uint16) * 257
    rgb16 = SPLIT.astype(np.uint16) * 257
    rgba16 = np.concatenate([rgb16, np.full((64, 64, 1), 32896, np.uint16)], -1)  # half transparent
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    return {
        "gray16": (Image.fromarray(gray16), "png"), "rgb16": (rgb16, "png"), "rgba16": (rgba16, "png"),
        "palette": (rgb.convert("P"), "png"), "gray_alpha": (rgb.convert("LA"), "png"), "rgba": (rgba, "png"),
        "bilevel": (rgb.convert("1"), "png"), "float": (Image.fromarray(np.asarray(rgb.convert("L")).astype(np.float32) / 255), "tiff"),
    }  # fmt: skip


def _expected(case):
    """What a faithful download of a picture case holds: RGB at 8 bits, transparency over white, at 32 px."""
    rgb = Image.fromarray(SPLIT)
    if case in ("gray16", "gray_alpha"):
        rgb = rgb.convert("L").convert("RGB")
    elif case in ("rgba16", "rgba"):
        rgb = Image.fromarray(np.rint(SPLIT * (128 / 255) + 255 * (1 - 128 / 255)).astype(np.uint8))
    elif case == "bilevel":
        rgb = rgb.convert("1").convert("RGB")
    return np.asarray(rgb.resize((32, 32), Image.BICUBIC)).astype(float)


@pytest.fixture(scope="module")
def download_of_bad_inputs(repo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_download")
    files = _bad_images(tmp / "images")
    with _servers(tmp / "images") as (served, refused, silent):
        urls = {name: path.as_uri() for name, path in files.items()}
        urls |= {"http_good": f"{served}/good.jpg", "http_404": f"{served}/missing.jpg",
                 "refused": f"{refused}/good.jpg", "timeout": f"{silent}/good.jpg"}
        (tmp / "filter").mkdir()
        rows = pd.DataFrame([{**ROW, "URL": url, "TEXT": f"case {name}"} for name, url in urls.items()])
        rows.to_parquet(tmp / "filter" / "kept.parquet", index=False)
        code = main(["download", "--params", str(repo / "params.yaml"), "--scale", "smoke", "--set", "download.timeout_s=2",
                     "--set", "download.url_schemes=[file, http]",
                     "--filtered", str(tmp / "filter"), "--corpus", str(tmp), "--out", str(tmp / "download")])
    assert code == 0
    written = {caption.removeprefix("case "): image for _, image, caption in iter_samples([tmp / "download"])}
    return json.loads((tmp / "download" / "stats.json").read_text()), written, list(urls)


@pytest.mark.parametrize("case", ["good", "gray", "cmyk", "huge", "tiny", "http_good"])
def test_decodable_images_of_any_mode_and_size_are_written_as_rgb_at_the_resolution(download_of_bad_inputs, case):
    _, written, _ = download_of_bad_inputs
    assert written[case].mode == "RGB" and written[case].size == (32, 32)


@pytest.mark.parametrize("case", ["gray16", "rgb16", "rgba16", "palette", "gray_alpha", "rgba", "bilevel"])
def test_images_of_other_modes_and_depths_are_written_as_the_picture_they_show(download_of_bad_inputs, case):
    """16-bit images (once stored as uniform white), palettes, transparency and bilevel images keep
    their picture: the written image is the expected 8-bit RGB one, within JPEG's error."""
    _, written, _ = download_of_bad_inputs
    image = np.asarray(written[case].convert("RGB")).astype(float)
    assert image.std() > 20, "a blank image was written"
    assert np.abs(image - _expected(case)).mean() < (16 if case == "bilevel" else 8)


@pytest.mark.parametrize("case", ["truncated", "empty", "text", "http_404", "refused", "timeout", "float"])
def test_unusable_images_and_dead_urls_are_counted_not_fatal_and_not_written(download_of_bad_inputs, case):
    stats, written, _ = download_of_bad_inputs
    assert case not in written
    assert stats["failed_to_download"] + stats["failed_to_resize"] >= 7
    assert case != "float" or any("float32 pixels" in kind for kind in stats["errors"])  # its pixels' scale is unknown


def test_every_row_is_either_written_or_counted_as_a_failure(download_of_bad_inputs):
    stats, written, cases = download_of_bad_inputs
    assert stats["count"] == len(cases)
    assert stats["written"] == len(written) == stats["successes"]
    assert stats["written"] + stats["failed_to_download"] + stats["failed_to_resize"] == len(cases)
    kinds = " ".join(stats["errors"])
    assert "404" in kinds and ("refused" in kinds.lower() or "errno 111" in kinds.lower()) and "timed out" in kinds.lower()


# Paths: missing or broken outputs of earlier stages --------------------------------------------


def test_a_truncated_latent_shard_stops_training_before_the_first_step(capsys, repo, smoke_stages, tmp_path):
    import shutil

    data = tmp_path / "encode"
    shutil.copytree(smoke_stages / "encode", data)
    shard = max((data / "shards").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    code, first = stage(capsys, repo, "train", tmp_path / "out", "--data", data, "--init", smoke_stages / "base", "--objective", "mse",
                        "--conditioning", "text", "--checkpoints", tmp_path / "checkpoints")
    assert code == 1 and first.startswith(f"--data {data / 'shards'}: {shard}: truncated")
    assert_nothing_written(tmp_path / "out")
    assert not list((tmp_path / "checkpoints").glob("*/run-*/step-*"))


# External files in the paper's formats, malformed -------------------------------------------


def _external_inputs(rehearsal_inputs, tmp_path):
    """A copy of the rehearsal's LAION parquet, COCO captions and images, to break one at a time."""
    import shutil

    folder = tmp_path / "external"
    shutil.copytree(rehearsal_inputs / "coco", folder / "coco")
    shutil.copy(rehearsal_inputs / "laion" / "metadata.parquet", folder / "metadata.parquet")
    return {"laion_parquet": folder / "metadata.parquet", "coco_captions": folder / "coco" / "annotations" / "captions_val2014.json",
            "coco_images": folder / "coco" / "val2014"}  # fmt: skip


def _break(case, files):
    """Breaks one file; returns the start of the message after "corpus: "."""
    laion, captions, images = files["laion_parquet"], files["coco_captions"], files["coco_images"]
    if case == "a parquet that is really a CSV":
        pd.read_parquet(laion).to_csv(laion, index=False)
        return f"corpus.laion_parquet: {laion}: not a parquet file ("
    if case == "lower-case LAION columns":
        rows = pd.read_parquet(laion)
        rows.rename(columns=str.lower).to_parquet(laion, index=False)
        return f"corpus.laion_parquet: {laion}: missing the LAION column(s) URL, TEXT, WIDTH, HEIGHT, AESTHETIC_SCORE; it has url, text, "
    if case == "truncated COCO captions":
        captions.write_text(captions.read_text()[:500])
        return f"corpus.coco_captions: {captions}: not valid JSON (line 1, column "
    if case == "COCO captions that are not JSON":
        captions.write_bytes(bytes(range(256)))
        return f"corpus.coco_captions: {captions}: not "
    if case == "an annotation of an unknown image":
        document = json.loads(captions.read_text())
        document["annotations"][0]["image_id"] = 999999999
        captions.write_text(json.dumps(document))
        return f"corpus.coco_captions: {captions}: an annotation names image_id 999999999, which its 'images' does not list"
    if case == "a COCO image missing on disk":
        first = json.loads(captions.read_text())["annotations"][0]["image_id"]
        name = next(image["file_name"] for image in json.loads(captions.read_text())["images"] if image["id"] == first)
        (images / name).unlink()
        return f"corpus.coco_images: {images}: 1 of the images the captions name are not there, e.g. {name}"
    raise AssertionError(case)


EXTERNAL_CASES = ["a parquet that is really a CSV", "lower-case LAION columns", "truncated COCO captions", "COCO captions that are not JSON",
                  "an annotation of an unknown image", "a COCO image missing on disk"]  # fmt: skip


def _external_corpus(capsys, repo, files, out, *extra):
    overrides = ["corpus.source=external", *(f"corpus.{key}={path}" for key, path in files.items()), *extra]
    return stage(capsys, repo, "corpus", out, *(f"--set={o}" for o in overrides))


@pytest.mark.parametrize("case", EXTERNAL_CASES)
def test_a_malformed_external_file_is_named_in_one_line(capsys, repo, rehearsal_inputs, tmp_path, case):
    files = _external_inputs(rehearsal_inputs, tmp_path)
    expected = _break(case, files)
    code, first = _external_corpus(capsys, repo, files, tmp_path / "corpus", "corpus.num_eval_captions=8")
    assert code == 1 and first.startswith(f"corpus: {expected}"), first
    assert_nothing_written(tmp_path / "corpus")


def test_fewer_coco_captions_than_asked_are_used_with_a_warning(capsys, caplog, repo, rehearsal_inputs, tmp_path):
    files = _external_inputs(rehearsal_inputs, tmp_path)
    available = len(json.loads(files["coco_captions"].read_text())["annotations"])
    with caplog.at_level("WARNING"):
        code, first = _external_corpus(capsys, repo, files, tmp_path / "corpus", f"corpus.num_eval_captions={available + 5}")
    assert code == 0, first
    assert f"holds {available} captions, fewer than corpus.num_eval_captions = {available + 5}" in caplog.text
    summary = json.loads((tmp_path / "corpus" / "summary.json").read_text())
    assert summary["eval_rows"] == available < summary["eval_captions_asked"]


def test_nan_scores_are_counted_under_their_own_name_and_empty_metadata_is_named(capsys, caplog, repo, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = pd.DataFrame([{**ROW, "URL": f"images/{i}.jpg", "AESTHETIC_SCORE": float("nan") if i < 3 else 7.0} for i in range(10)])
    rows.to_parquet(corpus / "laion.parquet", index=False)
    with caplog.at_level("WARNING"):
        code, first = stage(capsys, repo, "filter", tmp_path / "filter", "--corpus", corpus)
    assert code == 0, first
    stats = json.loads((tmp_path / "filter" / "stats.json").read_text())
    assert stats["removed_by"]["missing_AESTHETIC_SCORE"] == 3 and stats["removed_by"]["aesthetic"] == 0 and stats["rows_kept"] == 7
    assert "3 of 10 rows have no AESTHETIC_SCORE (NaN)" in caplog.text
    rows.iloc[:0].to_parquet(corpus / "laion.parquet", index=False)
    code, first = stage(capsys, repo, "filter", tmp_path / "empty", "--corpus", corpus)
    assert code == 1 and first.startswith(f"filter: {corpus / 'laion.parquet'} has no rows: the metadata is empty"), first


def test_a_download_that_loses_most_urls_warns(capsys, caplog, repo, tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 48), (30, 160, 60)).save(tmp_path / "images" / "good.jpg")
    (tmp_path / "filter").mkdir()
    with serve(tmp_path / "images") as url:
        urls = [f"{url}/good.jpg"] + [f"{url}/dead{i}.jpg" for i in range(9)]
        pd.DataFrame([{**ROW, "URL": u, "TEXT": f"case {i}"} for i, u in enumerate(urls)]).to_parquet(tmp_path / "filter" / "kept.parquet", index=False)
        with caplog.at_level("WARNING"):
            code, first = stage(capsys, repo, "download", tmp_path / "download", "--filtered", tmp_path / "filter", "--corpus", tmp_path)
    assert code == 0, first
    assert "download: 90% of the URLs could not be fetched (9 of 10;" in caplog.text and "trains on 1 images" in caplog.text


def test_a_base_model_folder_without_its_unet_is_named(capsys, repo, rehearsal_inputs, tmp_path):
    import shutil

    model = tmp_path / "sd21-base"
    shutil.copytree(rehearsal_inputs / "sd21-base", model)
    shutil.rmtree(model / "unet")
    code, first = stage(capsys, repo, "base", tmp_path / "base", f"--set=base.pretrained={model}")
    assert code == 1 and first == f"base.pretrained: {model}: model_index.json names unet/, which the folder lacks (an incomplete download?)"
    assert_nothing_written(tmp_path / "base")


# Training that diverges, and models and latents that are not finite --------------------------


def _train(capsys, repo, smoke_stages, tmp_path, data, *overrides):
    return stage(capsys, repo, "train", tmp_path / "out", "--data", data, "--init", smoke_stages / "base", "--objective", "mse",
                 "--conditioning", "text", "--checkpoints", tmp_path / "checkpoints", *(f"--set={o}" for o in overrides))


def _checkpoints(tmp_path):
    return sorted((tmp_path / "checkpoints").glob("*/run-*/step-*"))


def test_training_that_diverges_stops_naming_the_step_and_the_learning_rate_and_keeps_its_last_good_checkpoint(capsys, repo, smoke_stages, tmp_path):
    from safetensors.torch import load_file

    code, first = _train(capsys, repo, smoke_stages, tmp_path, smoke_stages / "encode", "train.mse.learning_rate=1.0e+3", "train.checkpoint_every_steps=1")
    assert code == 1 and first.startswith("train: the loss at step ") and "is not finite (NaN or inf); nothing of it was saved" in first, first
    assert "train.mse.learning_rate = 1000" in first
    step = int(first.removeprefix("train: the loss at step ").split()[0])
    assert step > 1 and _checkpoints(tmp_path), "no good checkpoint was made before it"  # the first step is still finite
    kept = _checkpoints(tmp_path)
    assert f"the last good checkpoint, {kept[-1]}, is kept" in first and int(kept[-1].name.removeprefix("step-")) < step
    for checkpoint in kept:  # nothing non-finite was saved
        assert all(tensor.isfinite().all() for tensor in load_file(checkpoint / "model.safetensors").values()), checkpoint
    assert_nothing_written(tmp_path / "out")
    # Run again (Snakemake's retries do) with the same settings: refused at once, saying why and how to go on.
    code, again = _train(capsys, repo, smoke_stages, tmp_path, smoke_stages / "encode", "train.mse.learning_rate=1.0e+3", "train.checkpoint_every_steps=1")
    assert code == 1 and again.startswith(first) and "found by an earlier attempt" in again and _checkpoints(tmp_path) == kept


def test_latents_that_are_not_finite_stop_training_at_its_first_step_naming_the_data(capsys, repo, smoke_stages, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    data = tmp_path / "encode"
    shutil.copytree(smoke_stages / "encode", data)
    for shard in (data / "shards").glob("*.safetensors"):
        tensors = load_file(shard)
        tensors["mean"] = torch.full_like(tensors["mean"], float("nan"))
        save_file(tensors, shard)
    code, first = _train(capsys, repo, smoke_stages, tmp_path, data)
    assert code == 1 and first.startswith("train: the loss at step 1 is not finite"), first
    assert f"that step's batch is not finite itself: the latents in --data {data} hold NaN or inf" in first
    assert "no checkpoint was made before it" in first and not _checkpoints(tmp_path)
    assert_nothing_written(tmp_path / "out")


def _poisoned_model(smoke_stages, tmp_path, component, change):
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(smoke_stages / "base", model)
    (weights,) = (model / "pipeline" / component).glob("*.safetensors")
    tensors = load_file(weights)
    change(tensors)
    save_file(tensors, weights)
    return model


def test_a_model_with_weights_that_are_not_finite_is_refused_before_sampling(capsys, repo, smoke_stages, tmp_path):
    def nan(tensors):
        name = next(iter(tensors))
        tensors[name][..., 0] = float("nan")

    model = _poisoned_model(smoke_stages, tmp_path, "unet", nan)
    code, first = stage(capsys, repo, "sample", tmp_path / "sample", "--model", model, "--corpus", smoke_stages / "corpus", "--row", "mse_s50")
    assert code == 1 and first == (f"--model {model}: the weights of unet in {model / 'pipeline'} are not finite (NaN or inf): "
                                   "was its training diverging?")  # fmt: skip
    assert_nothing_written(tmp_path / "sample")


def test_latents_that_overflow_are_refused_by_encode_naming_an_image(capsys, repo, smoke_stages, tmp_path):
    def overflow(tensors):  # finite weights whose latents are not: the encoder's last convolution scaled past float32's range
        for name in ("quant_conv.weight", "quant_conv.bias"):
            tensors[name] *= 1e38

    model = _poisoned_model(smoke_stages, tmp_path, "vae", overflow)
    code, first = stage(capsys, repo, "encode", tmp_path / "encode", "--images", smoke_stages / "download", "--base", model)
    assert code == 1 and first.startswith("encode: the latents or text embeddings of ") and "are not finite (NaN or inf), e.g. '" in first, first
    assert "nothing was written" in first
    assert_nothing_written(tmp_path / "encode")


@pytest.mark.parametrize("broken", ["latest truncated", "every one unreadable"])
def test_a_broken_checkpoint_is_named_and_training_resumes_from_the_newest_good_one(capsys, caplog, repo, smoke_stages, tmp_path, broken):
    import json as json_

    every = "train.checkpoint_every_steps=5"
    assert _train(capsys, repo, smoke_stages, tmp_path, smoke_stages / "encode", every)[0] == 0
    (run,) = (tmp_path / "checkpoints").glob("*/run-1")
    (run / "finished.json").unlink()  # as if stopped after its last checkpoint, before its outputs were reported
    kept = _checkpoints(tmp_path)
    assert [path.name for path in kept] == ["step-00000015", "step-00000020"]
    if broken == "latest truncated":
        model = kept[-1] / "model.safetensors"
        model.write_bytes(model.read_bytes()[:1000])
    else:
        for checkpoint in kept:
            (checkpoint / "state.json").write_text("")
    import shutil

    shutil.rmtree(tmp_path / "out")
    with caplog.at_level("WARNING"):
        code, first = _train(capsys, repo, smoke_stages, tmp_path, smoke_stages / "encode", every)
    assert code == 0, first
    said = caplog.text
    assert f"checkpoint {kept[-1]} is broken: " in said
    resumed = json_.loads((tmp_path / "out" / "metrics.json").read_text())["resumed_from_step"]
    if broken == "latest truncated":
        assert resumed == 15 and f"checkpoint {kept[0]} is broken" not in said
    else:
        assert resumed == 0 and f"checkpoint {kept[0]} is broken" in said and "training starts afresh from step 0" in said
    assert (run / f"broken-{kept[-1].name}").is_dir()  # kept to look at, never tried again


# Two writers at once ------------------------------------------------------------------------


@contextmanager
def _held_by_another_process(lock_file):
    """A process that holds ``lock_file`` as a stage does, until the block ends; yields its pid."""
    import subprocess
    import sys

    code = ("import sys, time; from pathlib import Path; from selfperceptual.pipeline.io import hold_exclusively; "
            "held = hold_exclusively(Path(sys.argv[1]), 'the test'); print('held', flush=True); time.sleep(600)")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock_file)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_dvc_cannot_write_a_stage_output_that_another_process_is_writing(repo, tmp_path):
    """Snakemake's jobs and DVC's stages run the same stage commands, which lock their output: a
    `dvc repro` beside a running Snakemake is refused that stage, naming the process, and writes
    nothing; once that process has ended the same command runs."""
    import subprocess
    import sys

    from workspace import copy_repository, run

    copy = copy_repository(tmp_path / "repo", scale="smoke")
    run([sys.executable, "-m", "selfperceptual.pipeline.dag", "--write", "dvc.yaml"], copy)
    out = copy / "runs" / "smoke" / "corpus"
    with _held_by_another_process(out.parent / ".corpus.lock") as pid:
        refused = run([sys.executable, "-m", "dvc", "repro", "--single-item", "corpus"], copy, check=False)
        said = refused.stdout + refused.stderr
        assert refused.returncode != 0 and f"error: corpus: runs/smoke/corpus is being written by another process (pid {pid} on " in said, said[-3000:]
        assert_nothing_written(out)
    run([sys.executable, "-m", "dvc", "repro", "--single-item", "corpus"], copy)
    assert (out / "laion.parquet").is_file()
    assert subprocess.run(["git", "status", "--porcelain", "runs"], cwd=copy, capture_output=True, text=True).stdout == ""  # lock files stay out of git


def test_two_processes_cannot_train_into_one_checkpoint_folder(capsys, repo, smoke_stages, tmp_path):
    import subprocess
    import sys
    import time

    first = subprocess.Popen([sys.executable, "-m", "selfperceptual", "train", "--params", str(repo / "params.yaml"), "--scale", "smoke",
                              "--out", str(tmp_path / "first"), "--data", str(smoke_stages / "encode"), "--init", str(smoke_stages / "base"),
                              "--objective", "mse", "--conditioning", "text", "--checkpoints", str(tmp_path / "checkpoints")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "checkpoints").glob("*/train.lock")) and time.monotonic() < deadline:
            time.sleep(0.1)
        (lock,) = (tmp_path / "checkpoints").glob("*/train.lock")
        code, message = _train(capsys, repo, smoke_stages, tmp_path, smoke_stages / "encode")  # the same settings, another --out
        assert first.poll() is None, "the first training ended before the second was tried"
        assert code == 1 and message.startswith(f"train: the checkpoints in {lock.parent} are being trained into by another process "
                                                f"(pid {first.pid} on "), message  # fmt: skip
        assert_nothing_written(tmp_path / "out")
    finally:
        first.kill()
        first.wait()


# Weights files from outside: none can run code, each is checked ------------------------------


class _Payload:
    """Unpickled by a full torch.load, it runs a shell command that leaves ``marker`` behind."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _weights_with_payload(path, marker, state=None):
    import torch

    torch.save({**(state or {"weight": torch.zeros(2)}), "extra": _Payload(marker)}, path)
    return path


def _inception_case(case, rehearsal_inputs, tmp_path):
    """(weights file, extra --set, expected start of the problem after the path) for each case."""
    import torch

    from selfperceptual.pipeline.rehearsal import INCEPTION_FILE

    real = rehearsal_inputs / "inception" / INCEPTION_FILE
    path = tmp_path / "inception.pth"
    if case == "missing":
        return path, [], "not a file. Download torch-fidelity's Inception-v3 weights"
    if case == "pickled payload":
        return _weights_with_payload(path, tmp_path / "PAYLOAD_RAN", torch.load(real, weights_only=True)), [], "not a plain weights file, refused without running it (Trying to load unsupported GLOBAL posix.system"
    if case == "truncated":
        path.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
        return path, [], "not a plain weights file, refused without running it ("
    if case == "random bytes":
        path.write_bytes(bytes(range(256)) * 64)
        return path, [], "not a plain weights file, refused without running it ("
    if case == "another network's":
        torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, path)
        return path, [], "not Inception-v3's weights as torch-fidelity names them (Error(s) in loading state_dict"
    if case == "not the published file":
        return real, ["featnet.inception_sha256=0123abcd"], "SHA-256 "
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "pickled payload", "truncated", "random bytes", "another network's", "not the published file"])
def test_an_inception_weights_file_that_is_not_the_published_one_is_refused_in_one_line_running_nothing(capsys, repo, smoke_stages, rehearsal_inputs, tmp_path, case):
    import hashlib

    weights, extra, problem = _inception_case(case, rehearsal_inputs, tmp_path)
    overrides = ["featnet.kind=inception", f"featnet.inception_weights={weights}", "evaluate.precision=fp32", *extra]
    code, first = stage(capsys, repo, "featnet", tmp_path / "featnet", "--corpus", smoke_stages / "corpus", *(f"--set={o}" for o in overrides))
    assert code == 1 and first.startswith(f"featnet.inception_weights: {weights}: {problem}"), first
    if case == "not the published file":
        assert f"SHA-256 {hashlib.sha256(weights.read_bytes()).hexdigest()}, not the published 0123abcd" in first
    assert not (tmp_path / "PAYLOAD_RAN").exists()
    assert_nothing_written(tmp_path / "featnet")


def test_aesthetic_and_vgg_weights_with_a_pickled_payload_are_refused_and_the_payload_is_live(tmp_path):
    import torch

    from selfperceptual.method.cascade import BackboneLPIPS
    from selfperceptual.method.weights import WeightsFileError
    from selfperceptual.pipeline.aesthetics import AestheticPredictor

    marker = tmp_path / "PAYLOAD_RAN"
    evil = _weights_with_payload(tmp_path / "evil.pth", marker)
    with pytest.raises(WeightsFileError, match=rf"^aesthetic\.weights: {evil}: not a plain weights file, refused without running it"):
        AestheticPredictor.load(evil)
    with pytest.raises(WeightsFileError, match=rf"^metric_weights: {evil}: not a plain weights file, refused without running it"):
        BackboneLPIPS("vgg", evil)
    with pytest.raises(WeightsFileError, match=r"^metric_weights: .*: SHA-256 [0-9a-f]{64}, not the published 397923af"):
        BackboneLPIPS("vgg", evil, "397923af")  # the hash is checked before the file is read at all
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # what reading it as torch-fidelity did would have done
    assert marker.exists()


BROKEN_MODELS = {  # case -> (stage, its arguments with the broken folder as {model}, what breaks it)
    "sample, no unet": ("sample", ["--model", "{model}", "--corpus", "{corpus}", "--row", "mse_s50"], "pipeline/unet", None),
    "sample, not a model folder": ("sample", ["--model", "{model}", "--corpus", "{corpus}", "--row", "mse_s50"], "pipeline", None),
    "encode, truncated text encoder": ("encode", ["--images", "{download}", "--base", "{model}"], "pipeline/text_encoder/model.safetensors", 600),
    "encode, no tokenizer vocabulary": ("encode", ["--images", "{download}", "--base", "{model}"], "pipeline/tokenizer/tokenizer.json", None),
}


@pytest.mark.parametrize("case", sorted(BROKEN_MODELS))
def test_a_model_folder_missing_or_truncating_a_component_is_named_before_any_work(capsys, repo, smoke_stages, tmp_path, case):
    import shutil

    name, arguments, broken, keep_bytes = BROKEN_MODELS[case]
    model = tmp_path / "model"
    shutil.copytree(smoke_stages / "base", model)
    target = model / broken
    if keep_bytes:
        target.write_bytes(target.read_bytes()[:keep_bytes])
    else:
        (shutil.rmtree if target.is_dir() else Path.unlink)(target)
    folders = {"model": model, "corpus": smoke_stages / "corpus", "download": smoke_stages / "download"}
    code, first = stage(capsys, repo, name, tmp_path / name, *(value.format(**folders) for value in arguments))
    flag = arguments[arguments.index("{model}") - 1]
    if broken == "pipeline":
        assert code == 1 and first == f"{flag} {model}: no pipeline/model_index.json; is this a base or train stage's folder?"
    else:
        assert code == 1 and first.startswith(f"{flag} {model}: cannot load the pipeline in {model / 'pipeline'}: "), first
    assert_nothing_written(tmp_path / name)


@pytest.fixture(scope="module")
def featnet_folder(repo, smoke_stages, tmp_path_factory):
    out = tmp_path_factory.mktemp("featnet") / "featnet"
    assert main(["featnet", "--params", str(repo / "params.yaml"), "--scale", "smoke", "--corpus", str(smoke_stages / "corpus"), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("removed", ["reference.safetensors", "featnet.safetensors", "extractor.json"])
def test_a_featnet_folder_missing_a_file_is_named_before_any_work(capsys, repo, smoke_stages, featnet_folder, tmp_path, removed):
    import shutil

    broken = tmp_path / "featnet"
    shutil.copytree(featnet_folder, broken)
    (broken / removed).unlink()
    code, first = stage(capsys, repo, "evaluate", tmp_path / "evaluate", "--samples", tmp_path / "no-samples", "--featnet", broken,
                        "--corpus", smoke_stages / "corpus")
    assert code == 1 and first.startswith(f"--featnet {broken}:") and removed in first
    assert_nothing_written(tmp_path / "evaluate")


@pytest.mark.parametrize(("row", "cause"), [("sp_s52", "no such sampling row"), ("sp_layer_decoder_s25_seed1", "sp_layer_decoder_s25 is not trained once per seed")])
def test_an_unknown_sampling_row_is_named_before_any_work(capsys, repo, smoke_stages, tmp_path, row, cause):
    code, first = stage(capsys, repo, "sample", tmp_path / "sample", "--model", smoke_stages / "base", "--corpus", smoke_stages / "corpus", "--row", row)
    assert code == 1 and first.startswith(f"--row {row}: {cause}")
    assert_nothing_written(tmp_path / "sample")


def test_a_missing_samples_folder_is_named(capsys, repo, smoke_stages, featnet_folder, tmp_path):
    code, first = stage(capsys, repo, "evaluate", tmp_path / "evaluate", "--samples", tmp_path / "sample_mse_s25", "--featnet", featnet_folder,
                        "--corpus", smoke_stages / "corpus")
    assert code == 1 and first == f"--samples {tmp_path / 'sample_mse_s25'}: no samples.json; run its sample stage"
    assert_nothing_written(tmp_path / "evaluate")


# Faults ---------------------------------------------------------------------------------------


KILLED = {  # stage -> (its arguments, a file that shows it is halfway through writing, a file of its finished output)
    # the download waits on a server that never answers (until timeout_s), so it is surely killed mid-shard
    "download": (["--filtered", "{stalling_filter}", "--corpus", "{corpus}", "--set", "download.timeout_s=3"], "shards/*.tar", "stats.json"),
    "encode": (["--images", "{download}", "--base", "{base}"], "shards/*.safetensors", "index.json"),
    "featnet": (["--corpus", "{corpus}"], "params.json", "summary.json"),  # killed while its network trains
    "sample": (["--model", "{base}", "--corpus", "{corpus}", "--row", "mse_s25", "--set", "sample.batch=2", "--set", "sample.num_images=8"],
               "images/*.png", "samples.json"),
}  # train: tests/test_resume.py


@pytest.fixture
def stalling_filter(smoke_stages, tmp_path):
    """The smoke scale's kept rows plus one URL whose server accepts and never answers."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        folder = tmp_path / "stalling_filter"
        folder.mkdir()
        rows = pd.read_parquet(smoke_stages / "filter" / "kept.parquet")
        stalled = {**rows.iloc[0].to_dict(), "URL": f"http://127.0.0.1:{silent.getsockname()[1]}/never.jpg"}
        pd.concat([pd.DataFrame([stalled]), rows]).to_parquet(folder / "kept.parquet", index=False)
        yield folder


@pytest.mark.parametrize(
    ("name", "stop"),
    [(name, stop) for name in sorted(KILLED) for stop in ("SIGKILL", "SIGTERM")]
    + [("download", "SIGINT")],  # img2dataset's own handler made Ctrl-C a success with no output
)
def test_a_stage_stopped_halfway_leaves_no_output_nor_process_and_a_rerun_cleans_up_and_completes(repo, smoke_stages, stalling_filter, tmp_path, name, stop):
    import signal
    import subprocess
    import sys
    import time

    import psutil
    from workspace import environment

    inputs, halfway, finished = KILLED[name]
    out = tmp_path / name
    folders = {"stalling_filter": stalling_filter} | {stage: smoke_stages / stage for stage in ("corpus", "download", "base")}
    command = [sys.executable, "-m", "selfperceptual", name, "--params", str(repo / "params.yaml"), "--scale", "smoke",
               *(value.format(**folders) for value in inputs), "--out", str(out)]
    process = subprocess.Popen(command, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not list(tmp_path.glob(f".{name}.*partial/{halfway}")):
        assert process.poll() is None and time.monotonic() < deadline, f"{name} ended before it could be killed"
        time.sleep(0.05)
    workers = psutil.Process(process.pid).children(recursive=True)  # img2dataset's pool, for one
    process.send_signal(getattr(signal, stop))
    assert process.wait() == -getattr(signal, stop)
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"{name} left processes running: {[worker.cmdline() for worker in alive]}"
    assert not out.exists()  # at most a hidden temporary folder, which the next run removes
    rerun = subprocess.run(command, env=environment(), capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (out / finished).is_file() and not list(tmp_path.glob(f".{name}.*partial"))


@pytest.mark.parametrize("stop", ["Ctrl-C", "SIGTERM", "SIGKILL"])
def test_a_stopped_snakemake_keeps_finished_stages_and_a_plain_rerun_goes_on(tmp_path, stop):
    """Ctrl-C (SIGINT to the process group, pressed again while it runs), SIGTERM to the driver, or
    SIGKILL to the whole group (the OOM killer, a session ending) while a job runs: what finished
    before is kept and not redone, and `snakemake` with no flags goes on (profiles/default's
    rerun-incomplete; after SIGKILL the locks the dead driver left are removed, saying so)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from workspace import copy_repository, environment, run

    copy = copy_repository(tmp_path / "repo", scale="smoke")
    target = ["--cores", "1", "runs/smoke/base"]
    snakemake = subprocess.Popen([sys.executable, "-m", "snakemake", *target], cwd=copy, env=environment(),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    runs = copy / "runs" / "smoke"
    deadline = time.monotonic() + 300
    while not ((runs / "filter").is_dir() and list(runs.glob(".download.*partial"))):
        assert snakemake.poll() is None and time.monotonic() < deadline, "the pipeline ended before it could be interrupted"
        time.sleep(0.05)
    finished = (runs / "filter" / "params.json").stat().st_mtime_ns
    if stop == "Ctrl-C":
        for _ in range(5):  # what Ctrl-C does: the whole foreground process group; pressed again while it runs
            os.killpg(snakemake.pid, signal.SIGINT)  # (Snakemake's log handler drops a KeyboardInterrupt raised while it writes)
            try:
                snakemake.communicate(timeout=3)
                break
            except subprocess.TimeoutExpired:
                pass
    elif stop == "SIGTERM":
        snakemake.send_signal(signal.SIGTERM)
    else:
        os.killpg(snakemake.pid, signal.SIGKILL)
    output = snakemake.communicate(timeout=120)[0]
    assert snakemake.returncode != 0
    if stop == "SIGKILL":
        assert list((copy / ".snakemake" / "locks").glob("*.lock")), "the killed driver left no lock to remove"
    if stop == "SIGTERM":  # it let the running job finish, and says so rather than that a job failed
        assert "Stopped by SIGTERM once the jobs that were running had finished; none failed" in output, output[-3000:]
        assert "At least one job did not complete successfully" not in output and (runs / "download" / "stats.json").is_file()
    assert not (runs / "download").exists() or (runs / "download" / "stats.json").is_file()  # none, or a whole one
    again = run([sys.executable, "-m", "snakemake", *target], copy)
    said = again.stdout + again.stderr
    assert (runs / "base" / "pipeline" / "model_index.json").is_file()
    assert (runs / "filter" / "params.json").stat().st_mtime_ns == finished  # not redone
    assert not list(runs.glob(".*partial")), said[-2000:]
    assert ("Removed the locks of the Snakemake run" in said) == (stop == "SIGKILL"), said[-3000:]
    assert not list((copy / ".snakemake" / "locks").glob("*.lock"))


@pytest.fixture
def small_filesystem(tmp_path):
    import subprocess

    folder = tmp_path / "small"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True, check=False).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def test_a_full_disk_names_the_device_and_leaves_nothing_half_written(capsys, repo, small_filesystem):
    out = small_filesystem / "corpus"
    code, first = stage(capsys, repo, "corpus", out)
    assert code == 1 and first.startswith("no space left on the device of") and "was not written" in first
    assert_nothing_written(out)


def test_a_read_only_filesystem_names_the_folder_and_leaves_nothing_behind(capsys, repo, small_filesystem):
    import subprocess

    if subprocess.run(["mount", "-o", "remount,ro", str(small_filesystem)], capture_output=True, check=False).returncode:
        pytest.skip("cannot remount read-only here (needs root)")
    out = small_filesystem / "corpus"
    code, first = stage(capsys, repo, "corpus", out)
    assert code == 1 and first.startswith(f"cannot write to {small_filesystem}") and "Read-only file system" in first
    assert_nothing_written(out)
