"""Serving: Ray Serve deploys a model behind OpenAI's HTTP API, with continuous batching inside each
replica.

protocol.py (request checks and response shapes, no Ray), runner.py (gptcore's BatchEngine on a
decode thread), models.py (what a replica loads), app.py (the deployment and its routes),
deploy.py (settings, the application, `gptflow serve`), playground.html (the page at GET /).
"""
