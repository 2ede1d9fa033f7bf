"""The HTTP service (``dgmrec serve``) on a tiny DGMRec run: answers against the Python API's, added items,
feedback, restarts, concurrent writes and reads, bad requests."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import httpx
from fastapi.testclient import TestClient

import dgmrec
from dgmrec import api
from dgmrec.data.mmrec import write_mmrec
from dgmrec.data.raw import write_id_table
from dgmrec.data.synthetic import make_synthetic
from dgmrec.serving.app import create_app
from dgmrec.serving.state import ServingState
from dgmrec.serving.store import STORE_NAME

N_USERS, N_ITEMS = 120, 80


def user_id(u: int) -> str:
    return f"user-{u}"


def item_id(i: int) -> str:
    return f"item-{i}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DGMRec run (2 epochs) on a synthetic folder whose id maps name users ``user-N`` and items ``item-N``."""
    root = tmp_path_factory.mktemp("serving")
    ds = make_synthetic(n_users=N_USERS, n_items=N_ITEMS, interactions_per_user=10, seed=3, name="tiny")
    folder = root / "data"
    folder.mkdir()
    write_mmrec(ds, folder)
    write_id_table(folder / "user_ids.csv", [user_id(u) for u in range(ds.n_users)], "userID")
    write_id_table(folder / "item_ids.csv", [item_id(i) for i in range(ds.n_items)], "itemID")
    run = root / "run"
    dgmrec.train("DGMRec", str(folder), out=run, overrides={"epochs": 2, "eval_step": 1}, progress=False)
    return run


@pytest.fixture()
def run_dir(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained run (its store starts empty)."""
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst




def _raw(values: pd.Series, name: Callable[[int], str]) -> list[str]:
    """Ids of an ``api.recommend`` column as raw ids (integer columns are internal indices)."""
    if pd.api.types.is_integer_dtype(values):
        return [name(int(v)) for v in values]
    return [str(v) for v in values]


def api_lists(run: Path | api.LoadedRun, k: int, exclude: str,
              added: tuple[str, ...] = ()) -> dict[str, tuple[list[str], np.ndarray]]:
    """``api.recommend``'s lists by raw user id; ``added``: ids of the items added to the run, in order."""
    table = api.recommend(run, k=k, exclude=exclude)
    users = _raw(table["user"], user_id)
    items = _raw(table["item"], lambda i: item_id(i) if i < N_ITEMS else added[i - N_ITEMS])
    out: dict[str, tuple[list[str], list[float]]] = {}
    for u, i, s in zip(users, items, table["score"], strict=True):
        out.setdefault(u, ([], []))
        out[u][0].append(i)
        out[u][1].append(float(s))
    return {u: (i, np.asarray(s)) for u, (i, s) in out.items()}


def checksums(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(STORE_NAME)}


def recs(c: TestClient | httpx.Client, user: str, k: int = 10, exclude: str = "seen") -> dict:
    r = c.get(f"/users/{user}/recommendations", params={"k": k, "exclude": exclude})
    assert r.status_code == 200, r.text
    return r.json()


# ----------------------------------------------------------------------------------------------- reading
@pytest.mark.parametrize("exclude", ["seen", "train", "none"])
def test_recommendations_equal_the_python_api(client: TestClient, run_dir: Path, exclude: str) -> None:
    expected = api_lists(run_dir, 10, exclude)
    for u in (0, 7, 55, N_USERS - 1):
        body = recs(client, user_id(u), 10, exclude)
        items, scores = expected[user_id(u)]
        assert body["source"] == "model"
        assert [x["item"] for x in body["items"]] == items
        np.testing.assert_allclose([x["score"] for x in body["items"]], scores, rtol=1e-5, atol=1e-6)
        assert [x["rank"] for x in body["items"]] == list(range(1, 11))


def test_similar_items_are_the_cosine_neighbours(client: TestClient, run_dir: Path, tmp_path: Path) -> None:
    lr = api.load_run(run_dir)
    items = lr.model.final_embeddings()[1].detach().numpy()
    completed = np.load(api.generate(lr, tmp_path / "completed") / "text_feat.npy")
    for space, x in (("final", items), ("text", completed)):
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        for i in (0, 13, 79):
            sims = unit @ unit[i]
            sims[i] = -np.inf
            order = np.argsort(-sims, kind="stable")[:5]
            params = {"k": 5} if space == "final" else {"k": 5, "modality": space}
            body = client.get(f"/items/{item_id(i)}/similar", params=params).json()
            assert body["space"] == space
            assert [x["item"] for x in body["items"]] == [item_id(j) for j in order]
            np.testing.assert_allclose([x["score"] for x in body["items"]], sims[order], rtol=1e-4, atol=1e-5)


def test_eval_representations_are_what_the_default_scoring_multiplies(run_dir: Path, tmp_path: Path) -> None:
    lr = api.load_run(run_dir)
    model = lr.model
    model.train()
    assert model.eval_representations() is None  # nothing cached while parameters may change
    model.eval()
    model.prepare_eval()
    reps = model.eval_representations()
    assert reps is not None
    users, items = reps
    assert users.shape[0] == N_USERS and items.shape[0] == N_ITEMS
    which = torch.tensor([0, 9, N_USERS - 1])
    torch.testing.assert_close(model.score_users(which), users[which] @ items.T)
    api.add_items(lr, {"audio": np.full((2, 32), 0.4, dtype=np.float32)}, out=tmp_path / "added")
    assert model.eval_representations() is None  # adding items drops the cache
    model.prepare_eval()
    users, items = model.eval_representations()  # type: ignore[misc]
    assert items.shape[0] == N_ITEMS + 2
    torch.testing.assert_close(model.score_users(which), users[which] @ items.T)


def test_ann_index_finds_the_exact_neighbours(run_dir: Path) -> None:
    exact, ann = ServingState(run_dir), ServingState(run_dir, ann_above=0)
    hits = total = 0
    for i in range(0, N_ITEMS, 7):
        for modality in (None, "image"):
            a = set(exact.similar(item_id(i), 10, modality).items)
            b = ann.similar(item_id(i), 10, modality).items
            assert item_id(i) not in b and len(b) == 10
            hits += len(a & set(b))
            total += 10
    assert hits / total >= 0.95
    exact.close()
    ann.close()


def test_openapi_schema_lists_every_route(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert {"/users/{user}/recommendations", "/items/{item}/similar", "/items", "/feedback", "/health",
            "/metrics"} <= set(schema["paths"])
    assert "AddItemsRequest" in schema["components"]["schemas"]


def test_metrics_count_requests_per_route(client: TestClient) -> None:
    for _ in range(3):
        recs(client, user_id(1))
    client.get("/users/nobody/recommendations")
    client.get("/health")
    routes = client.get("/metrics").json()["routes"]
    r = routes["GET /users/{user}/recommendations"]
    assert (r["count"], r["errors_4xx"], r["errors_5xx"]) == (4, 1, 0)
    assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
    assert routes["GET /health"]["count"] == 1


# ----------------------------------------------------------------------------------------------- feedback
def test_feedback_is_excluded_at_once_and_new_users_get_content_lists(client: TestClient, run_dir: Path) -> None:
    top = recs(client, user_id(3), 5)["items"]
    first, second = top[0]["item"], top[1]["item"]
    r = client.post("/feedback", json={"interactions": [{"user": user_id(3), "item": first},
                                                        {"user": "newcomer", "item": item_id(4)},
                                                        {"user": "newcomer", "item": item_id(9)}]})
    assert r.status_code == 200, r.text
    assert r.json() == {"stored": 3, "new_users": ["newcomer"]}
    after = recs(client, user_id(3), 5)["items"]
    assert first not in [x["item"] for x in after] and after[0]["item"] == second
    assert recs(client, user_id(3), 5, "none")["items"][0]["item"] == first  # feedback is not training
    # the new user: mean final representation of their items against every item, their items left out
    items = api.load_run(run_dir).model.final_embeddings()[1].detach().numpy()
    scores = items @ items[[4, 9]].mean(axis=0)
    scores[[4, 9]] = -np.inf
    body = recs(client, "newcomer", 6)
    assert body["source"] == "content"
    assert [x["item"] for x in body["items"]] == [item_id(j) for j in np.argsort(-scores, kind="stable")[:6]]
    assert client.get("/health").json()["new_users"] == 1


def test_exported_feedback_is_importable(run_dir: Path, tmp_path: Path) -> None:
    from dgmrec.cli import main

    state = ServingState(run_dir)
    state.add_feedback([("alice", item_id(1), 100.0), ("alice", item_id(2), 200.0), (user_id(5), item_id(3), 150.0)])
    state.close()
    main(["serve", "--run", str(run_dir), "--export", str(tmp_path / "fb.csv")])
    table = pd.read_csv(tmp_path / "fb.csv", dtype={"user": str, "item": str})
    assert table.values.tolist() == [["alice", item_id(1), 100.0], ["alice", item_id(2), 200.0],
                                     [user_id(5), item_id(3), 150.0]]
    from dgmrec.data.raw import read_raw_interactions

    raw = read_raw_interactions(tmp_path / "fb.csv", "user", "item", "timestamp")
    assert sorted(raw.user_ids) == ["alice", user_id(5)] and len(raw.users) == 3


# ------------------------------------------------------------------------------------------- added items
def _image_of(run_dir: Path, i: int) -> list[float]:
    folder = Path(json.loads((run_dir / "results.json").read_text())["run"]["dataset_spec"]["data"])
    return np.load(folder / "image_feat.npy")[i].astype(float).tolist()


def _with_image(run_dir: Path) -> int:
    """An item whose image the dataset observes (its completed image row is its own)."""
    return int(np.flatnonzero(api.load_run(run_dir).dataset.observed[:, 0])[3])


def test_added_item_is_recommendable_and_matches_the_python_api(client: TestClient, run_dir: Path,
                                                                tmp_path: Path) -> None:
    source = _with_image(run_dir)
    image = _image_of(run_dir, source)
    r = client.post("/items", json={"items": [{"id": "fresh", "features": {"image": image, "text": None}}]})
    assert r.status_code == 200, r.text
    assert r.json()["items"] == [{"id": "fresh", "observed": ["image"], "generated": ["text", "audio"],
                                  "imputed": []}]
    # the Python API with the same item gives the same lists
    lr = api.load_run(run_dir)
    api.add_items(lr, {"image": np.asarray([image], dtype=np.float32)}, item_ids=["fresh"], out=tmp_path / "added")
    expected = api_lists(lr, N_ITEMS + 1, "none", added=("fresh",))
    body = recs(client, user_id(8), N_ITEMS + 1, "none")
    assert [x["item"] for x in body["items"]] == expected[user_id(8)][0]
    assert "fresh" in [x["item"] for x in body["items"]]
    # the copied image makes its source the nearest image neighbour
    near = client.get("/items/fresh/similar", params={"k": 1, "modality": "image"}).json()["items"]
    assert near[0]["item"] == item_id(source) and near[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert client.get("/health").json()["added_items"] == 1


def test_restart_keeps_added_items_and_feedback(run_dir: Path) -> None:
    first = ServingState(run_dir)
    with TestClient(create_app(first)) as c:
        for item in ({"id": "a1", "features": {"image": _image_of(run_dir, 5)}},  # two requests, one replay
                     {"id": "a2", "features": {"text": [0.5] * 48, "audio": [0.1] * 32}}):
            r = c.post("/items", json={"items": [item]})
            assert r.status_code == 200, r.text
        c.post("/feedback", json={"interactions": [{"user": user_id(2), "item": "a1"},
                                                   {"user": "bob", "item": "a2"}]})
        before = {u: recs(c, u, N_ITEMS + 2) for u in (user_id(2), "bob")}
        sim_before = c.get("/items/a2/similar", params={"k": 5, "modality": "image"}).json()
        health_before = c.get("/health").json()
    first.close()
    second = ServingState(run_dir)
    with TestClient(create_app(second)) as c:
        health = c.get("/health").json()
        assert (health["added_items"], health["new_users"], health["feedback"]) == (2, 1, 2)
        assert {k: health[k] for k in ("users", "items")} == {k: health_before[k] for k in ("users", "items")}
        for u, body in before.items():
            again = recs(c, u, N_ITEMS + 2)
            assert [x["item"] for x in again["items"]] == [x["item"] for x in body["items"]]
            np.testing.assert_allclose([x["score"] for x in again["items"]], [x["score"] for x in body["items"]],
                                       rtol=1e-5, atol=1e-6)
        assert c.get("/items/a2/similar", params={"k": 5, "modality": "image"}).json() == sim_before
    second.close()
    assert (run_dir / STORE_NAME).is_file()


def test_restart_keeps_feedback_and_new_users(run_dir: Path) -> None:
    first = ServingState(run_dir)
    first.add_feedback([(user_id(4), item_id(k), None) for k in range(3)] + [("carol", item_id(7), 5.0)])
    before = {u: first.recommend(u, 8) for u in (user_id(4), "carol")}
    first.close()
    second = ServingState(run_dir)
    assert second.health()["feedback"] == 4 and second.health()["new_users"] == 1
    for u, ranked in before.items():
        again = second.recommend(u, 8)
        assert (again.items, again.source) == (ranked.items, ranked.source)
    assert not {item_id(k) for k in range(3)} & set(second.recommend(user_id(4), 20).items)
    second.close()


def test_checkpoint_bytes_unchanged(run_dir: Path) -> None:
    before = checksums(run_dir)
    state = ServingState(run_dir)
    with TestClient(create_app(state)) as c:
        assert c.post("/feedback", json={"interactions": [{"user": user_id(1), "item": item_id(2)}]}).is_success
        r = c.post("/items", json={"items": [{"id": "z", "features": {"audio": [0.2] * 32}}]})
        assert r.status_code == 200, r.text
        recs(c, user_id(1))
    state.close()
    assert checksums(run_dir) == before
    assert "best.pt" in before and "checkpoint.pt" in before


# ------------------------------------------------------------------------------------------- concurrency
@contextmanager
def serving(state: ServingState) -> Iterator[str]:
    """The app of ``state`` on a uvicorn server on 127.0.0.1 (a free port), in a thread."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=0, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _hammer(url: str, adders: int, items_per_adder: int, feeders: int) -> tuple[list[str], set[str]]:
    """Readers ask for lists while writers add items and feedback; returns the failures and the added ids."""
    failures: list[str] = []
    known = {item_id(i) for i in range(N_ITEMS)}
    planned = {f"new-{a}-{j}" for a in range(adders) for j in range(items_per_adder)}
    stop = threading.Event()

    def read(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                u = int(rng.integers(N_USERS))
                r = c.get(f"/users/{user_id(u)}/recommendations", params={"k": 20, "exclude": "train"})
                if r.status_code != 200:
                    failures.append(f"read {r.status_code} {r.text}")
                    continue
                items = [x["item"] for x in r.json()["items"]]
                scores = [x["score"] for x in r.json()["items"]]
                if len(items) != 20 or len(set(items)) != 20 or not set(items) <= known | planned \
                        or scores != sorted(scores, reverse=True):
                    failures.append(f"torn answer {items} {scores}")

    def add(a: int) -> None:
        rng = np.random.default_rng(100 + a)
        with httpx.Client(base_url=url, timeout=60) as c:
            for j in range(items_per_adder):
                body = {"items": [{"id": f"new-{a}-{j}", "features": {"image": rng.normal(size=64).tolist()}}]}
                r = c.post("/items", json=body)
                if r.status_code != 200:
                    failures.append(f"add {r.status_code} {r.text}")

    def feed(f: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            for j in range(10):
                r = c.post("/feedback", json={"interactions": [{"user": f"fan-{f}", "item": item_id(j)}]})
                if r.status_code != 200:
                    failures.append(f"feedback {r.status_code} {r.text}")

    readers = [threading.Thread(target=read, args=(s,)) for s in range(3)]
    writers = [threading.Thread(target=add, args=(a,)) for a in range(adders)]
    writers += [threading.Thread(target=feed, args=(f,)) for f in range(feeders)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    return failures, planned


def test_waiting_additions_are_added_together_and_fail_alone(run_dir: Path) -> None:
    from dgmrec.errors import InputError
    from dgmrec.serving.state import ConflictError

    state = ServingState(run_dir)
    results: dict[str, object] = {}

    def add(name: str, ident: str, width: int) -> None:
        try:
            results[name] = state.add_items([(ident, {"audio": [0.5] * width})])
        except InputError as exc:
            results[name] = exc

    jobs = [("a", "x1", 32), ("b", "x2", 32), ("c", "x1", 32), ("d", "x3", 7)]
    threads = [threading.Thread(target=add, args=job) for job in jobs]
    with state._write_lock:  # an addition is running: the requests queue up
        for t in threads:
            t.start()
        while len(state._pending) < len(jobs):
            time.sleep(0.01)
    for t in threads:
        t.join()
    assert [x.id for x in results["b"]] == ["x2"]  # type: ignore[union-attr]
    assert isinstance(results["d"], InputError) and results["d"].source == "items[0].features.audio"
    duplicate = [results["a"], results["c"]]
    assert sum(isinstance(r, ConflictError) for r in duplicate) == 1
    added = state.store.added_items(state.dims)
    assert sorted(added.ids) == ["x1", "x2"] and len(set(added.batches.tolist())) == 1  # one model update
    assert state.health()["added_items"] == 2 and {"x1", "x2"} <= set(state.similar(item_id(0), N_ITEMS + 1).items)
    state.close()


def test_concurrent_feedback_and_reads_lose_nothing(run_dir: Path) -> None:
    state = ServingState(run_dir)
    with serving(state) as url:
        failures, _ = _hammer(url, adders=0, items_per_adder=0, feeders=4)
        health = httpx.get(f"{url}/health").json()
    state.close()
    assert failures == []
    assert (health["feedback"], health["new_users"]) == (40, 4)


def test_concurrent_adds_and_reads_lose_nothing(run_dir: Path) -> None:
    state = ServingState(run_dir)
    with serving(state) as url:
        failures, planned = _hammer(url, adders=3, items_per_adder=4, feeders=2)
        with httpx.Client(base_url=url) as c:
            health = c.get("/health").json()
            everything = [x["item"] for x in recs(c, user_id(0), N_ITEMS + 12, "none")["items"]]
    state.close()
    assert failures == []
    assert health["added_items"] == 12 and health["feedback"] == 20
    assert planned <= set(everything)
    assert len(ServingState(run_dir).store.added_items({"image": 64, "text": 48, "audio": 32})) == 12


# ----------------------------------------------------------------------------------------- bad requests
BAD = [
    ("get", "/users/nobody/recommendations", None, 404, "user"),
    ("get", "/items/nothing/similar", None, 404, "item"),
    ("get", f"/users/{user_id(1)}/recommendations?k=0", None, 422, "k"),
    ("get", f"/users/{user_id(1)}/recommendations?k=100000", None, 422, "k"),
    ("get", f"/users/{user_id(1)}/recommendations?k=ten", None, 422, "k"),
    ("get", f"/users/{user_id(1)}/recommendations?exclude=all", None, 422, "exclude"),
    ("get", f"/items/{item_id(1)}/similar?modality=smell", None, 422, "modality"),
    ("post", "/items", {"items": [{"features": {"image": [0.1] * 5}}]}, 422, "items[0].features.image"),
    ("post", "/items", {"items": [{"features": {"smell": [0.1] * 5}}]}, 422, "items[0].features"),
    ("post", "/items", {"items": [{"features": {"image": None}}]}, 422, "items[0].features"),
    ("post", "/items", {"items": [{"features": {"image": ["x"] * 64}}]}, 422, "items[0].features.image[0]"),
    ("post", "/items", {"items": []}, 422, "items"),
    ("post", "/items", {"items": [{"id": item_id(3), "features": {"image": [0.1] * 64}}]}, 409, "items[0].id"),
    ("post", "/items", {"things": []}, 422, "items"),
    ("post", "/feedback", {"interactions": [{"user": "a", "item": "missing"}]}, 404, "interactions[0].item"),
    ("post", "/feedback", {"interactions": [{"user": "", "item": item_id(1)}]}, 422, "interactions[0].user"),
    ("post", "/feedback", {"interactions": [{"user": "a", "item": item_id(1), "rating": 5}]}, 422,
     "interactions[0].rating"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "field"), BAD)
def test_bad_requests_get_4xx_naming_the_field(client: TestClient, method: str, path: str, body: dict | None,
                                               status: int, field: str) -> None:
    r = client.request(method.upper(), path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field
    assert r.json()["detail"].startswith(field)


def test_malformed_bodies_get_4xx_without_tracebacks(client: TestClient, run_dir: Path) -> None:
    nan = '{"items": [{"features": {"image": [NaN' + ", 0.1" * 63 + "]}}]}"
    cases = [nan, "{not json", "", "[]", '{"interactions": "x"}', '{"items": [{"features": {"image": 3}}]}']
    for path in ("/items", "/feedback"):
        for text in cases:
            r = client.post(path, content=text, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (path, text, r.text)
            assert "Traceback" not in r.text and r.json()["detail"]
    r = client.post("/items", content=nan, headers={"content-type": "application/json"})
    assert r.json()["field"] == "items[0].features.image[0]"
    small = ServingState(run_dir, store_path=run_dir / "other.sqlite")
    with TestClient(create_app(small, max_body_bytes=1000)) as c:
        r = c.post("/items", json={"items": [{"features": {"image": [0.1] * 64}}] * 10})
        assert r.status_code == 413 and r.json()["field"] == "body"

        def stream() -> Iterator[bytes]:  # no Content-Length: counted while it arrives
            yield b'{"items": ['
            for _ in range(50):
                yield b'{"features": {"image": [' + b"0.1, " * 63 + b"0.1]}},"
            yield b"]}"

        r = c.post("/items", content=stream(), headers={"content-type": "application/json"})
        assert r.status_code == 413
    small.close()


def test_exported_items_hold_the_sent_and_the_completed_features(run_dir: Path, tmp_path: Path) -> None:
    from dgmrec.cli import main
    from dgmrec.data.masks import load_plain_mask

    image = _image_of(run_dir, 30)
    state = ServingState(run_dir)
    state.add_items([("shoe", {"image": image}), ("hat", {"text": [0.25] * 48, "audio": [1.0] * 32})])
    completed = {m: state.snapshot.spaces[m][-2:] for m in ("image", "text", "audio")}  # unit rows
    state.close()
    main(["serve", "--run", str(run_dir), "--export-items", str(tmp_path / "added")])
    ids = pd.read_csv(tmp_path / "added" / "item_ids.csv", dtype=str)
    assert ids["original_id"].tolist() == ["shoe", "hat"]
    observed, modalities = load_plain_mask(tmp_path / "added" / "observed.npz")
    assert modalities == ["image", "text", "audio"]
    assert observed.tolist() == [[True, False, False], [False, True, True]]
    image_rows = np.load(tmp_path / "added" / "image_feat.npy")
    np.testing.assert_allclose(image_rows[0], image, rtol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "added" / "audio_feat.npy")[1], 1.0)
    for m, unit in completed.items():  # the generated rows are the ones similar-item search uses
        rows = np.load(tmp_path / "added" / f"{m}_feat.npy")
        assert np.isfinite(rows).all()
        np.testing.assert_allclose(rows / np.linalg.norm(rows, axis=1, keepdims=True), unit, rtol=1e-4, atol=1e-5)


def test_items_added_with_the_python_api_are_served_under_their_ids(run_dir: Path) -> None:
    api.add_items(run_dir, {"audio": np.full((1, 32), 0.3, dtype=np.float32)}, item_ids=["from-api"])
    state = ServingState(run_dir)  # load_run adds RUN_DIR/added_items again: part of the run the service loads
    assert state.health()["items"] == N_ITEMS + 1 and state.health()["added_items"] == 0
    assert "from-api" in state.recommend(user_id(0), N_ITEMS + 1, "none").items
    assert state.similar("from-api", 3, "audio").items
    state.close()
