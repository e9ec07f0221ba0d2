"""edge: turns an NVIDIA Jetson (or any Linux host) into a vision sensor that speaks MQTT."""

__version__ = "0.1.0"
