"""The gateway's control plane: one FastAPI app beside the lean completion hot path.

    app.py       create_control_app(): the admin API, /v1/credits, /v1/usage, /overview, and its
                 OpenAPI document behind the admin key (/admin/openapi.json)
    models.py    request and response bodies (pydantic): the schema, closed and strict
    body.py      bounded, strict JSON bodies, read after the admin key is checked
    errors.py    every refusal as an OpenAI-style error body, never a traceback
    overview.py  the /overview routes (login, logout, page, static files)
"""
