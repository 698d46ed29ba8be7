"""bytedeploy serve: the OpenAI-compatible HTTP server (app.py), its request and response format (api.py), the
scheduler that batches requests over a model's batch session in a process of its own (scheduler.py), its metrics
(metrics.py) and the command (command.py).

Deploy side: serving a bundle imports no torch (a checkpoint's model brings it).
"""
