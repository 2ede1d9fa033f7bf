"""Serving a trained run over HTTP (``dgmrec serve``; the optional ``serve`` extra).

``store`` keeps what must survive a restart (added items, their features, feedback, new users) in SQLite;
``state`` holds the scoring state of the run and swaps immutable snapshots of it; ``schemas`` declares the
request and response bodies; ``app`` builds the FastAPI application. Only ``app`` imports FastAPI, so the
store and the state are usable (``dgmrec serve --export``) without the extra.
"""
