"""/docs (Swagger UI) and /redoc from files this server ships, so they work without internet.

FastAPI's own pages load their JavaScript, CSS and icon from a CDN; litserve builds the FastAPI
app with them. They are replaced by the same pages pointing at the Swagger UI and ReDoc bundles
that the fastapi-offline package carries as package data, served under STATIC_URL.
"""
from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (get_redoc_html, get_swagger_ui_html,
                                  get_swagger_ui_oauth2_redirect_html)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS, REDOC, STATIC_URL = "/docs", "/redoc", "/docs-static"
ASSETS = files("fastapi_offline") / "static"  # swagger-ui-bundle.js, swagger-ui.css, ...


def install_offline_docs(app: FastAPI) -> None:
    """Serve /docs, its OAuth2 redirect page and /redoc from local assets instead of a CDN."""
    redirect = app.swagger_ui_oauth2_redirect_url
    app.router.routes[:] = [route for route in app.router.routes
                            if getattr(route, "path", None) not in (DOCS, REDOC, redirect)]
    app.mount(STATIC_URL, StaticFiles(directory=str(ASSETS)), name="docs-static")

    async def swagger(request: Request) -> HTMLResponse:
        root = _root(request)
        return get_swagger_ui_html(
            openapi_url=root + app.openapi_url, title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=root + redirect if redirect else None,
            swagger_js_url=f"{root}{STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{STATIC_URL}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters)

    async def oauth2_redirect(_: Request) -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    async def redoc(request: Request) -> HTMLResponse:
        root = _root(request)
        return get_redoc_html(openapi_url=root + app.openapi_url, title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{root}{STATIC_URL}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{STATIC_URL}/favicon.png",
                              with_google_fonts=False)

    app.add_route(DOCS, swagger, include_in_schema=False)
    if redirect:
        app.add_route(redirect, oauth2_redirect, include_in_schema=False)
    app.add_route(REDOC, redoc, include_in_schema=False)


def _root(request: Request) -> str:
    """The prefix a reverse proxy mounts the app under (uvicorn --root-path), without a '/'."""
    return request.scope.get("root_path", "").rstrip("/")
