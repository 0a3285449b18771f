"""Tasks: what the one training engine (:mod:`jaxdiff.engine.loop`) trains. Each is one file of its own config
schema, model building, loss / step, data and callbacks; :mod:`jaxdiff.tasks.registry` maps ``config.task`` to
it and runs it."""
