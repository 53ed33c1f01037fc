"""The HTTP face of `fslm serve`: an OpenAI-compatible app over a `Stack` (app.py), the checks every request passes
before a route (guard.py), request validation (parse.py), the scheduler that batches requests stage by stage
(scheduler.py), what the server can be told (options.py), and the page at / (index.html)."""
