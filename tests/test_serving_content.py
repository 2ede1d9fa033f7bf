"""Items added with raw content (a text, an image's bytes): encoded as the run's dataset folder was built, over
HTTP (``POST /items`` with ``content``) and in the Python API (``dgmrec.api.content_features``).

The dataset is built by ``dgmrec.features.build_dataset`` with two small deterministic stand-in encoders
registered under names of their own; the run is a short DGMRec training on it.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("fastapi")
Image = pytest.importorskip("PIL.Image")

from fastapi.testclient import TestClient  # noqa: E402

import dgmrec  # noqa: E402
from dgmrec import api  # noqa: E402
from dgmrec.errors import InputError  # noqa: E402
from dgmrec.features import (  # noqa: E402
    ImageSource,
    InteractionsSpec,
    TextSource,
    build_dataset,
    built_modalities,
    encode_given,
    register_image_encoder,
    register_text_encoder,
)
from dgmrec.features.given import BuiltModality  # noqa: E402
from dgmrec.serving.app import create_app  # noqa: E402
from dgmrec.serving.state import ServingState  # noqa: E402
from test_features import HashTextEncoder, MeanColorImageEncoder  # noqa: E402
from test_serving import trained  # noqa: E402, F401  (a run on a folder of precomputed features)

N_ITEMS, N_USERS = 40, 60
LOADS = {"text": 0, "image": 0}  # how often the encoders were built in this process
BUILD_LOADS: dict[str, int] = {}  # ... of which by the dataset build


class WordsEncoder(HashTextEncoder):
    """The features tests' 8-d text hash, under a name of its own."""

    name = "serve-test-words"
    cache_id = "serve-test-words/1"


class ColourEncoder(MeanColorImageEncoder):
    """The features tests' 6-d colour statistics (RGB mean and std, 0..1), under a name of its own."""

    name = "serve-test-colour"
    cache_id = "serve-test-colour/1"


def _words(device: str) -> WordsEncoder:
    LOADS["text"] += 1
    return WORDS


def _colour(device: str) -> ColourEncoder:
    LOADS["image"] += 1
    return ColourEncoder()


WORDS = WordsEncoder()
register_text_encoder("serve-test-words", _words)
register_image_encoder("serve-test-colour", _colour)


def _colour_of(i: int) -> tuple[int, int, int]:
    return (37 * i) % 256, (91 * i + 40) % 256, (53 * i + 7) % 256


def _png(colour: tuple[int, ...], mode: str = "RGB", size: tuple[int, int] = (10, 7)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _text_of(i: int) -> str:
    return f"item {i}: " + " ".join(f"word{(i * k) % 13}" for k in range(1, 6))


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A dataset folder built from texts and images (items 3 and 11 lack text, 5 and 17 lack an image), and a
    DGMRec run on it."""
    root = tmp_path_factory.mktemp("content")
    (root / "img").mkdir()
    texts, images = [], []
    for i in range(N_ITEMS):
        texts.append("" if i in (3, 11) else _text_of(i))
        if i in (5, 17):
            images.append("")
        else:
            (root / "img" / f"{i}.png").write_bytes(_png(_colour_of(i)))
            images.append(f"img/{i}.png")
    pd.DataFrame({"sku": [f"sku-{i}" for i in range(N_ITEMS)], "description": texts, "image": images}).to_csv(
        root / "items.csv", index=False)
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"sku-{i}", t) for u in range(N_USERS)
            for t, i in enumerate(rng.choice(N_ITEMS, size=8, replace=False))]
    pd.DataFrame(rows, columns=["user", "item", "ts"]).to_csv(root / "inter.csv", index=False)
    data = root / "data"
    build_dataset(InteractionsSpec(root / "inter.csv", "user", "item", "ts"), root / "items.csv", "sku",
                  name="shop", out=data, sources=[TextSource(columns=("description",)), ImageSource(column="image")],
                  encoders={"text": "serve-test-words", "image": "serve-test-colour"}, progress=False)
    BUILD_LOADS.update(LOADS)
    run = root / "run"
    dgmrec.train("DGMRec", str(data), out=run, overrides={"epochs": 1, "eval_step": 1}, progress=False)
    return data, run


@pytest.fixture()
def run_dir(shop: tuple[Path, Path], tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(shop[1], dst)
    return dst


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _stored(state: ServingState, modality: str) -> np.ndarray:
    return state.store.added_items(state.dims).features[modality]


# ------------------------------------------------------------------------------------------------ encoding
def test_content_gets_the_vector_the_build_gave_it(client: TestClient, shop: tuple[Path, Path]) -> None:
    data, _ = shop
    text_rows, image_rows = np.load(data / "text_feat.npy"), np.load(data / "image_feat.npy")
    body = {"items": [
        {"id": "twin-8", "content": {"text": "  " + _text_of(8) + "\n", "image": _b64(_png(_colour_of(8)))}},
        {"id": "words-only", "content": {"text": _text_of(21)}},
        {"id": "picture-only", "content": {"image": "data:image/png;base64," + _b64(_png(_colour_of(30)))}},
    ]}
    r = client.post("/items", json=body)
    assert r.status_code == 200, r.text
    assert [(x["id"], x["observed"], x["generated"]) for x in r.json()["items"]] == [
        ("twin-8", ["image", "text"], []), ("words-only", ["text"], ["image"]), ("picture-only", ["image"], ["text"])]
    state: ServingState = client.app.state.serving  # type: ignore[attr-defined]
    text, image = _stored(state, "text"), _stored(state, "image")
    # the same content as items 8, 21 and 30 of the build: the same vectors, to the bit
    np.testing.assert_array_equal(text[0], text_rows[8])
    np.testing.assert_array_equal(image[0], image_rows[8])
    np.testing.assert_array_equal(text[1], text_rows[21])
    np.testing.assert_array_equal(image[2], image_rows[30])
    assert np.isnan(image[1]).all() and np.isnan(text[2]).all()  # not sent: generated, stored as not observed
    near = client.get("/items/twin-8/similar", params={"k": 1, "modality": "text"}).json()["items"]
    assert near[0] == {"item": "sku-8", "score": pytest.approx(1.0, abs=1e-5)}
    users = client.get("/users/u0/recommendations", params={"k": N_ITEMS + 3, "exclude": "none"}).json()
    assert {"twin-8", "words-only", "picture-only"} <= {x["item"] for x in users["items"]}


def test_transparent_image_is_composited_on_white_as_in_the_build(client: TestClient) -> None:
    r = client.post("/items", json={"items": [{"id": "ghost", "content": {"image": _b64(
        _png((0, 0, 255, 0), mode="RGBA"))}}]})
    assert r.status_code == 200, r.text
    state: ServingState = client.app.state.serving  # type: ignore[attr-defined]
    np.testing.assert_allclose(_stored(state, "image")[0], [1, 1, 1, 0, 0, 0], atol=1e-6)  # white, flat


def test_encoders_load_once_per_process(run_dir: Path) -> None:
    for _ in range(2):  # two services in one process
        state = ServingState(run_dir, store_path=run_dir / f"store-{_}.sqlite")
        with TestClient(create_app(state)) as c:
            for k in range(3):
                r = c.post("/items", json={"items": [{"id": f"s{_}-{k}", "content": {
                    "text": f"fresh text {_} {k}", "image": _b64(_png(_colour_of(k)))}}]})
                assert r.status_code == 200, r.text
        state.close()
    assert {m: n + 1 for m, n in BUILD_LOADS.items()} == LOADS  # the build's loads, then one for both services
    assert {f"fresh text {a} {k}" for a in range(2) for k in range(3)} <= set(WORDS.seen)


def test_python_api_encodes_content_for_add_items(run_dir: Path, shop: tuple[Path, Path]) -> None:
    data, _ = shop
    lr = api.load_run(run_dir)
    rows = api.content_features(lr, [{"text": _text_of(2)}, {"image": _png(_colour_of(9)), "text": None}])
    assert sorted(rows) == ["image", "text"]
    np.testing.assert_array_equal(rows["text"][0], np.load(data / "text_feat.npy")[2])
    np.testing.assert_array_equal(rows["image"][1], np.load(data / "image_feat.npy")[9])
    assert np.isnan(rows["text"][1]).all() and np.isnan(rows["image"][0]).all()
    added = api.add_items(lr, rows, item_ids=["p", "q"], out=run_dir / "added")
    assert added.ids == ["p", "q"] and lr.dataset.observed[-2:].tolist() == [[False, True], [True, False]]
    with pytest.raises(InputError, match=r"^contents\[0\]\.image: not valid base64"):
        api.content_features(lr, [{"image": "%%%"}])


def test_built_modalities_read_the_report(shop: tuple[Path, Path], tmp_path: Path) -> None:
    data, _ = shop
    built = built_modalities(data)
    assert built["text"] == BuiltModality("text", "text", "serve-test-words", "serve-test-words/1", 8)
    assert built["image"] == BuiltModality("image", "image", "serve-test-colour", "serve-test-colour/1", 6)
    assert built["text"].takes_text and not built["image"].takes_text
    assert built_modalities(tmp_path) == {}  # precomputed features: no record


def test_an_encoder_that_is_not_the_recorded_one_is_refused() -> None:
    other = BuiltModality("text", "text", "serve-test-words", "serve-test-words/0", 8)  # built by an older version
    with pytest.raises(InputError, match=r"^items\[0\]\.content\.text: the text encoder 'serve-test-words' found "
                                         r"here .* is not the one"):
        encode_given(other, ["a text"], ["items[0].content.text"])


# ---------------------------------------------------------------------------------------------- bad content
BAD = [
    ({"content": {"image": "not base64!"}}, "items[0].content.image", "not valid base64"),
    ({"content": {"image": "@@@@AAAA"}}, "items[0].content.image", "not valid base64"),  # no lenient decoding
    ({"content": {"image": _b64(b"GIF89a but not really")}}, "items[0].content.image", "unreadable image"),
    ({"content": {"image": ""}}, "items[0].content.image", "empty file"),
    ({"content": {"text": "   \n "}}, "items[0].content.text", "empty text"),
    ({"content": {"smell": "roses"}}, "items[0].content.smell", "unknown modality 'smell'"),
    ({"features": {"text": [0.1] * 8}, "content": {"text": "also"}}, "items[0].content.text", "not both"),
    ({"content": {"text": None}}, "items[0].features", "give at least one"),
    ({"content": {"text": 12}}, "items[0].content.text", "string"),
]


@pytest.mark.parametrize(("item", "field", "message"), BAD)
def test_bad_content_gets_422_naming_the_field(client: TestClient, item: dict, field: str, message: str) -> None:
    r = client.post("/items", json={"items": [{"id": "ok", "content": {"text": "fine"}}, item]})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["field"] == field.replace("[0]", "[1]")
    assert body["detail"].startswith(body["field"] + ": ") and message in body["detail"]
    assert "\n" not in body["detail"] and "Traceback" not in r.text
    assert client.get("/health").json()["added_items"] == 0  # the request failed as a whole


def test_content_that_is_all_unusable_names_the_reason(client: TestClient) -> None:
    r = client.post("/items", json={"items": [{"content": {"text": " "}}, {"content": {"text": "\t"}}]})
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == "items[0].content.text: empty text"


def test_without_the_features_extra_content_gets_422(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "PIL.Image", None)  # the extra's image library cannot be imported
    r = client.post("/items", json={"items": [{"content": {"image": _b64(_png((1, 2, 3)))}}]})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "items[0].content.image"
    assert "pip install 'dgmrec[features]'" in r.json()["detail"]


def test_a_run_on_precomputed_features_refuses_content(trained: Path, tmp_path: Path) -> None:  # noqa: F811
    shutil.copytree(trained, tmp_path / "run")
    state = ServingState(tmp_path / "run")
    with TestClient(create_app(state)) as c:
        r = c.post("/items", json={"items": [{"id": "x", "content": {"image": _b64(_png((9, 9, 9)))}}]})
        assert r.status_code == 422, r.text
        assert r.json()["field"] == "items[0].content.image"
        assert "does not record how its 'image' features were built" in r.json()["detail"]
        r = c.post("/items", json={"items": [{"id": "x", "features": {"image": [0.1] * 64}}]})  # vectors still work
        assert r.status_code == 200, r.text
    state.close()


def test_restart_keeps_items_added_by_content(run_dir: Path) -> None:
    first = ServingState(run_dir)
    first.add_items([("t1", {})], [{"text": _text_of(4)}])
    before = first.similar("t1", 5, "text")
    first.close()
    second = ServingState(run_dir)
    assert second.health()["added_items"] == 1
    assert second.similar("t1", 5, "text") == before and before.items[0] == "sku-4"
    second.close()
    report = json.loads((Path(api.load_run(run_dir).spec.data) / "missing_content.json").read_text())
    assert report["modalities"]["text"]["encoder"] == "serve-test-words"


# ------------------------------------------------------------------------------------------ property tests
def test_no_content_gives_a_server_error(client: TestClient) -> None:
    """Whatever texts and image strings an item carries: 200, or a 4xx naming an item's field."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    images = st.one_of(st.none(), st.text(max_size=40), st.binary(max_size=300).map(_b64),
                       st.sampled_from([_b64(_png((5, 6, 7))), "data:image/png;base64," + _b64(_png((1, 1, 1)))]))
    texts = st.one_of(st.none(), st.text(max_size=60))
    content = st.one_of(st.fixed_dictionaries({"text": texts}, optional={"image": images}),
                        st.fixed_dictionaries({"image": images}, optional={"text": texts}))

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(content, min_size=1, max_size=3))
    def check(contents: list[dict[str, str | None]]) -> None:
        r = client.post("/items", json={"items": [{"content": c} for c in contents]})
        assert r.status_code < 500, r.text
        if r.status_code == 200:
            assert len(r.json()["items"]) == len(contents)
        else:
            assert r.status_code in (409, 422) and r.json()["field"].startswith("items[")

    check()


@pytest.mark.slow
def test_add_items_follows_the_schema_on_a_built_dataset(run_dir: Path) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

    state = ServingState(run_dir)
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(state, max_body_bytes=64 * 1024))

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=schema["/items"]["POST"].as_strategy())
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(checks=[not_a_server_error, status_code_conformance, response_schema_conformance])

    check()
    state.close()
