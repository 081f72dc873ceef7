"""The status page: a small starlette app (served by hypercorn on the node's trio loop) and its static assets.

`snapshot` builds the JSON the page shows, `app` serves the page and `/api/status`, `server` runs it.
The chart library (uPlot, MIT, `static/uPlot.LICENSE`) ships inside the package: no CDN.
"""
