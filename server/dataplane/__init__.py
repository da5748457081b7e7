"""The data plane: what the server does for a call, whichever binding (server/bindings/) it came by.

plane.py (DataPlane, the calls), normalize.py (the one checker, in its documented order; deadlines),
tensors.py, model.py (a served model and its checks), admission.py, names.py, state.py, vision.py
(the vision calls and their worker pool). Below it: scheduling (server/scheduling/, the batcher) and
the backends (server/backends/).
"""
