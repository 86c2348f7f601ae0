"""`edgemoe cluster`: edgemoe engines as Ray Serve replicas behind one OpenAI-compatible front door.

Each replica (replica.py) is `edgemoe serve`'s service — the same session, engine and routes — run inside a Ray
Serve deployment; the front door (front.py) forwards each HTTP request whole to a replica of the model the request
names (bridge.py) and relays the reply, so both paths answer with the same code. Ray ships as an extra:
`pip install 'edgemoe[cluster]'`.
"""
