"""Photos in, a row per face out: the detector finds real faces at known places and none where there are none,
predict.py's rows equal the Predictor's on the same crops, and the MLflow model takes arrays as it takes files,
answers a bad image with one sentence (in Python and through `mlflow models serve`) and never decodes a huge one."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
from conftest import free_port
from PIL import Image

from ferdist.constants import FER_CLASSES
from ferdist.data.images import MAX_PIXELS, to_pixels
from ferdist.errors import FerdistError
from ferdist.serve.faces import Box, crop, find_faces
from ferdist.serve.inference import Predictor, probability_columns
from ferdist.train.checkpoint import load_classifier


def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()  # 512×512 RGB, one frontal face


ASTRONAUT_FACE = Box(178, 68, 92, 92)
"""The astronaut's face (hairline to chin, cheek to cheek), marked by hand on the 512 px picture."""


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def two_face_photo() -> tuple[np.ndarray, list[Box]]:
    """A 640×480 colour photo: the astronaut's face at two places and sizes, one mirrored, on a soft gradient."""
    source = astronaut()
    face = Image.fromarray(source[40:200, 150:300])  # the head with some margin: 150 wide, 160 high
    y, x = np.mgrid[0:480, 0:640]
    photo = np.stack([(90 + x / 8), (110 + y / 6), (140 + (x + y) / 20)], axis=-1).clip(0, 255).astype(np.uint8)
    boxes = []
    for (left, top), scale, mirror in (((40, 120), 1.0, False), ((380, 60), 1.4, True)):
        scaled = face.resize((round(150 * scale), round(160 * scale)), Image.Resampling.BICUBIC)
        if mirror:
            scaled = scaled.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        photo[top : top + scaled.height, left : left + scaled.width] = np.asarray(scaled)
        fx = (150 - (178 - 150) - 92) if mirror else 178 - 150  # the face box's left inside the crop
        side = round(92 * scale)
        boxes.append(Box(left + round(fx * scale), top + round((68 - 40) * scale), side, side))
    return photo, boxes


def four_face_photo() -> tuple[np.ndarray, list[Box]]:
    """A 640×480 photo on a grey gradient: the astronaut's face and three faces of scikit-image's LFW subset (real
    photographs, 25 px, scaled up; one mirrored), each filling a known square."""
    from skimage import data

    grey = np.broadcast_to(np.linspace(90, 170, 640, dtype=np.float32), (480, 640)).copy()
    lfw = data.lfw_subset()  # 200 × 25×25 floats in 0-1; the first 100 are faces
    sources = {"astronaut": to_pixels(astronaut())[61:166, 172:277], 0: lfw[0] * 255, 3: lfw[3] * 255,
               5: lfw[5] * 255}  # fmt: skip
    boxes = []
    for source, x, y, side, mirror in (("astronaut", 40, 60, 150, False), (0, 250, 50, 130, False),
                                       (3, 450, 90, 130, True), (5, 150, 300, 140, False)):  # fmt: skip
        face = Image.fromarray(np.asarray(sources[source], np.float32)).resize((side, side), Image.Resampling.BILINEAR)
        pixels = np.asarray(face)
        grey[y : y + side, x : x + side] = pixels[:, ::-1] if mirror else pixels
        boxes.append(Box(x, y, side, side))
    return np.stack([np.clip(grey.round(), 0, 255).astype(np.uint8)] * 3, axis=-1), boxes


def test_the_detector_finds_real_faces_where_they_are_and_none_elsewhere() -> None:
    from skimage import data

    found = find_faces(to_pixels(astronaut()))
    assert len(found) == 1 and found[0].iou(ASTRONAUT_FACE) >= 0.5
    for photo, boxes in (four_face_photo(), two_face_photo()):
        found = find_faces(to_pixels(photo))
        assert len(found) == len(boxes)
        for box in boxes:
            assert max(f.iou(box) for f in found) >= 0.5, (box, found)
    assert [f.w for f in found] == sorted((f.w for f in found), reverse=True)  # largest first
    rng = np.random.default_rng(0)
    face_free = [data.coffee(), data.rocket(), rng.integers(0, 256, (480, 640), dtype=np.uint8),
                 np.tile(np.linspace(0, 255, 640, dtype=np.uint8), (480, 1))]  # fmt: skip
    for image in face_free:
        assert find_faces(to_pixels(image)) == []
    # A 4000×4000 picture of noise (once labelled "Disgust" at 0.80) holds no face either; searched at 1280 px.
    assert find_faces(rng.integers(0, 256, (4000, 4000), dtype=np.uint8)) == []


def test_predict_gives_a_row_per_face_equal_to_the_predictor_on_the_same_crops(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import predict as job

    photo, _ = two_face_photo()
    Image.fromarray(photo).save(tmp_path / "group.jpg", quality=95)
    out = tmp_path / "faces.json"
    args = ["--model", str(tiny_checkpoint), str(tmp_path / "group.jpg"), "--output", str(out)]
    assert job.main([*args, "--annotate", str(tmp_path / "drawn")]) == 0
    rows = json.loads(out.read_text())
    assert [r["face"] for r in rows] == [0, 1] and {r["file"] for r in rows} == {str(tmp_path / "group.jpg")}
    grey = to_pixels((tmp_path / "group.jpg").read_bytes())
    boxes = [Box(r["x"], r["y"], r["w"], r["h"]) for r in rows]
    assert boxes == find_faces(grey)
    model, cfg = load_classifier(tiny_checkpoint)
    expected = Predictor(model, image_size=cfg.model.image_size).probabilities(np.stack([crop(grey, b) for b in boxes]))
    got = np.array([[r[c] for c in probability_columns()] for r in rows])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [r["label"] for r in rows] == [FER_CLASSES[i] for i in expected.argmax(1)]
    drawn = Image.open(tmp_path / "drawn" / "group.png")
    assert drawn.size == (640, 480) and drawn.mode == "RGB"
    assert np.abs(np.asarray(drawn, dtype=int) - photo).max() > 100  # boxes were drawn on it
    assert "2 faces in 1 image" in capsys.readouterr().err


def test_predict_names_each_file_once_prints_names_as_they_are_and_overwrites_no_photo(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import predict as job

    photos = tmp_path / "photos"
    photos.mkdir()
    photo, _ = two_face_photo()
    Image.fromarray(photo).save(photos / "party [final].JPG", quality=95)  # markup-like name, upper-case suffix
    Image.fromarray(astronaut()).save(photos / "astronaut.png")
    (photos / "strip.png").write_bytes(png(np.full((1, 4000), 128, np.uint8)))  # thinner than any face
    out = tmp_path / "rows.csv"
    model = ["--model", str(tiny_checkpoint)]
    assert job.main([*model, str(photos), str(photos / "astronaut.png"), "--output", str(out),
                     "--annotate", str(photos)]) == 0  # fmt: skip
    lines = out.read_text().splitlines()
    assert [line.split(",")[:2] for line in lines[1:]] == [
        [str(photos / "astronaut.png"), "0"], [str(photos / "party [final].JPG"), "0"],
        [str(photos / "party [final].JPG"), "1"], [str(photos / "strip.png"), "-1"]]  # fmt: skip
    assert lines[-1].endswith(",no face,,,,,,,")  # no face: empty probabilities in CSV
    err = capsys.readouterr().err
    assert "3 faces in 3 images" in err and "wrote 3 annotated photos" in err
    assert Image.open(photos / "astronaut.png").size == (512, 512)  # the input, not overwritten
    assert Image.open(photos / "astronaut-1.png").size == (512, 512)  # its annotated copy beside it
    assert {p.name for p in photos.iterdir()} >= {"party [final].png", "strip-1.png"}

    monkeypatch.chdir(photos)  # a short name: the screen table does not wrap it
    assert job.main([*model, "party [final].JPG"]) == 0
    assert "party [final].JPG" in capsys.readouterr().out  # printed as named, not read as markup
    (tmp_path / "taken.csv").mkdir()
    assert job.main([*model, str(photos), "--output", str(tmp_path / "taken.csv")]) == 2
    assert "--output " + str(tmp_path / "taken.csv") + " is a folder; name a file" in capsys.readouterr().err


def huge_png(width: int, height: int) -> bytes:
    """A valid grey PNG of ``width`` × ``height`` zeros, built row by row so the test never holds its pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer, row, data = zlib.compressobj(1), b"\0" * (width + 1), []
    for _ in range(height):
        data.append(packer.compress(row))
    data.append(packer.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(data)) + chunk(b"IEND", b"")


def test_the_mlflow_model_takes_arrays_as_it_takes_files_and_refuses_bad_images_one_by_one(served) -> None:  # noqa: ANN001
    from mlflow.exceptions import MlflowException

    model, _ = served
    rng = np.random.default_rng(3)
    faces = rng.integers(0, 256, (5, 48, 48), dtype=np.uint8)
    from_arrays = model.predict(faces)
    from_files = model.predict(pd.DataFrame({"image": [png(f) for f in faces]}))
    pd.testing.assert_frame_equal(from_arrays, from_files)
    assert list(from_arrays["face"]) == [0] * 5 and (from_arrays["error"] == "").all()
    colour = model.predict(np.stack([faces] * 3, axis=-1))  # N×H×W×3
    np.testing.assert_allclose(colour[probability_columns()].to_numpy(), from_arrays[probability_columns()].to_numpy())
    one = model.predict(faces[0][..., None])  # one [H, W, 1] face is one image, not 48 strips
    assert list(one["face"]) == [0] and np.allclose(one[probability_columns()], from_arrays[probability_columns()][:1])
    assert list(model.predict(np.full((1, 4000), 9, np.uint8), params={"detect": "on"})["label"]) == ["no face"]
    photo, _ = two_face_photo()
    assert list(model.predict(photo[None])["face"]) == [0, 1]  # one photo as a batch of one: detected
    assert list(model.predict(photo[None], params={"detect": "off"})["face"]) == [0]

    bad = [b"\x89PNG\r\n\x1a\n garbage", b"", huge_png(10_000, 10_000)]
    table = model.predict(pd.DataFrame({"image": [png(faces[0]), *bad]}))
    assert list(table["face"]) == [0, -1, -1, -1] and table["label"].iloc[0] in FER_CLASSES
    errors = list(table["error"])
    assert errors[0] == ""
    assert errors[1] == "image 1 is not an image (16 bytes of no image format PIL knows); send PNG, JPEG, BMP, WebP " \
                        "or TIFF bytes"  # fmt: skip
    assert errors[2].startswith("image 2 is not an image (empty)")
    assert errors[3] == (f"image 3 is 10000×10000 (100 megapixels), over the {MAX_PIXELS / 1e6:.0f} megapixels "
                         "ferdist reads; downscale it first")  # fmt: skip
    assert table[probability_columns()].iloc[1:].isna().all().all()
    with pytest.raises(MlflowException) as refused:  # nothing classifiable: the request is refused
        model.predict([b"not an image"])
    assert refused.value.message.startswith("image 0 is not an image") and "\n" not in refused.value.message
    with pytest.raises(MlflowException, match="detect='sometimes' is not a detection mode"):
        model.predict(faces, params={"detect": "sometimes"})
    # What `mlflow models serve` runs for a request (without the server): the 400 body is the sentence alone.
    from mlflow.pyfunc.scoring_server import invocations

    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b"BM junk").decode()]]}})
    with pytest.raises(MlflowException) as served_error:
        invocations(body, "application/json", model, None)
    assert served_error.value.get_http_status_code() == 400
    reply = json.loads(served_error.value.serialize_as_json())
    assert reply["message"] == ("image 0 is not an image (7 bytes of no image format PIL knows); send PNG, JPEG, BMP, "
                                "WebP or TIFF bytes") and "stack_trace" not in reply  # fmt: skip
    with pytest.raises(FerdistError, match=r"image is 10000×10000"):
        to_pixels(np.broadcast_to(np.uint8(0), (10_000, 10_000)))  # an array is refused before it is copied


def test_a_huge_image_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    """Peak memory, in a fresh process: refusing a 10,000 × 10,000 PNG (100 MB of pixels) costs almost nothing."""
    path = tmp_path / "huge.png"
    path.write_bytes(huge_png(10_000, 10_000))
    script = f"""
import resource
from ferdist.errors import FerdistError
from ferdist.serve.inference import to_pixels
data = open({str(path)!r}, "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    to_pixels(data)
except FerdistError as exn:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, exn)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    grown_kib, message = out.split(" ", 1)
    assert int(grown_kib) < 20_000 and "10000×10000 (100 megapixels)" in message  # < 20 MB against 100 MB decoded


@pytest.mark.slow
def test_mlflow_models_serve_answers_images_and_refuses_bad_ones_with_the_sentence(served, tmp_path: Path) -> None:  # noqa: ANN001
    """The curl requests the README shows, against `mlflow models serve` on loopback."""
    model, folder = served
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", str(folder), "--env-manager",
                               "local", "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        said = []
        for line in server.stderr:  # uvicorn says when it is listening
            said.append(line)
            if "Uvicorn running" in line:
                break
        assert requests.get(f"{url}/ping", timeout=30).status_code == 200, "".join(said[-20:])
        faces = np.random.default_rng(4).integers(0, 256, (2, 48, 48), dtype=np.uint8)
        encoded = [base64.b64encode(png(f)).decode() for f in faces]

        def post(body: dict) -> requests.Response:
            return requests.post(f"{url}/invocations", json=body, timeout=60)

        split = post({"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}})
        assert split.status_code == 200
        expected = model.predict(faces)
        got = pd.DataFrame(split.json()["predictions"])
        np.testing.assert_allclose(got[probability_columns()].to_numpy(), expected[probability_columns()].to_numpy(),
                                   atol=1e-6)  # fmt: skip
        as_inputs = post({"inputs": {"image": encoded}, "params": {"detect": "off"}})
        arrays = post({"inputs": faces.tolist()})
        records = post({"dataframe_records": [{"image": e} for e in encoded]})
        for response in (as_inputs, arrays, records):
            assert response.status_code == 200
            assert pd.DataFrame(response.json()["predictions"])["label"].tolist() == got["label"].tolist()
        no_face = post({"inputs": [np.full((200, 200), 90).tolist()]})
        assert no_face.status_code == 200 and no_face.json()["predictions"][0]["p_happy"] is None  # null, not NaN

        for body, sentence in (
            ({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b"GIF89a...").decode()]]}},
             "image 0 is not an image (9 bytes of no image format PIL knows); send PNG, JPEG, BMP, WebP or TIFF bytes"),
            ({"inputs": {"picture": encoded}}, "the input has the fields ['picture']; send the images as 'image'"),
            ({"inputs": faces.tolist(), "params": {"detect": "yes"}},
             "detect='yes' is not a detection mode; use one of auto, on, off"),
        ):  # fmt: skip
            response = post(body)
            assert response.status_code == 400
            assert response.json()["message"] == sentence
            assert "stack_trace" not in response.json() and "/" not in response.text  # no server paths
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_model_registered_before_models_from_code_still_loads(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Models logged until now hold a cloud-pickled ``ferdist.registry.FerModel`` (these exact 141 bytes) and an
    input schema of one binary ``image`` column; loaded beside today's ferdist they answer with today's rows."""
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from ferdist.track.registry import FerModel

    old_pickle = (b"\x80\x05\x95\x82\x00\x00\x00\x00\x00\x00\x00\x8c\x10ferdist.registry\x94\x8c\x08FerModel\x94\x93"
                  b"\x94)\x81\x94}\x94\x8c\x13_predict_type_hints\x94\x8c\x17mlflow.models.signature\x94\x8c\n_TypeHints"
                  b"\x94\x93\x94)\x81\x94}\x94(\x8c\x05input\x94N\x8c\x06output\x94Nubsb.")  # fmt: skip
    folder = tmp_path / "old-model"
    mlflow.pyfunc.save_model(str(folder), python_model=FerModel(), artifacts={"checkpoint": str(tiny_checkpoint)},
                             signature=ModelSignature(inputs=Schema([ColSpec("binary", "image")])),
                             pip_requirements=["ferdist"])  # fmt: skip
    (folder / "python_model.pkl").write_bytes(old_pickle)
    faces = np.random.default_rng(5).integers(0, 256, (2, 48, 48), dtype=np.uint8)
    table = mlflow.pyfunc.load_model(str(folder)).predict(pd.DataFrame({"image": [png(f) for f in faces]}))
    model, cfg = load_classifier(tiny_checkpoint)
    expected = Predictor(model, image_size=cfg.model.image_size).probabilities(faces)
    np.testing.assert_allclose(table[probability_columns()].to_numpy(), expected, atol=1e-6)
    assert list(table["face"]) == [0, 0]


def test_a_model_logged_from_code_before_the_stage_packages_still_loads(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A model logged from code before the library moved into stage packages carries the code file of that day,
    which imports ``ferdist.serving`` (now ``ferdist.serve.serving``); loaded in a fresh process beside today's
    ferdist, it answers with today's rows."""
    import mlflow.pyfunc

    old_code = tmp_path / "mlflow_model.py"
    old_code.write_text("from mlflow.models import set_model\n\nfrom ferdist.serving import FerModel\n\n"
                        "set_model(FerModel())\n")  # fmt: skip
    folder = tmp_path / "old-model"
    mlflow.pyfunc.save_model(str(folder), python_model=str(old_code), artifacts={"checkpoint": str(tiny_checkpoint)},
                             pip_requirements=["ferdist"])  # fmt: skip
    faces = np.random.default_rng(6).integers(0, 256, (2, 48, 48), dtype=np.uint8)
    np.save(tmp_path / "faces.npy", faces)
    code = ("import sys, io, numpy as np, pandas as pd, mlflow.pyfunc; from PIL import Image\n"
            "faces = np.load(sys.argv[2]); pngs = []\n"
            "for f in faces:\n"
            "    b = io.BytesIO(); Image.fromarray(f).save(b, format='PNG'); pngs.append(b.getvalue())\n"
            "table = mlflow.pyfunc.load_model(sys.argv[1]).predict(pd.DataFrame({'image': pngs}))\n"
            "print(table.filter(like='p_').to_json(orient='values'))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, str(folder), str(tmp_path / "faces.npy")], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    model, cfg = load_classifier(tiny_checkpoint)
    expected = Predictor(model, image_size=cfg.model.image_size).probabilities(faces)
    np.testing.assert_allclose(np.array(json.loads(done.stdout.strip().splitlines()[-1])), expected, atol=1e-6)
