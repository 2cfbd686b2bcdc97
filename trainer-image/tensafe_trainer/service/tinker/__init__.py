"""The Tinker wire's part of the service: its keys (keys.py), its privacy policy (policy.py), what it keeps of its
sessions, models, samplers and checkpoint names (registry.py), and what acts on them (service.py). The door
(api/tinker/) only parses the wire's bodies and encodes its answers."""
