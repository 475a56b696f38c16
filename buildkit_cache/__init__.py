"""The core of buildkit-cache-exporter: the only code that talks to Docker and BuildKit.

It returns plain frozen values (`models`) to the exporter and the actuator.
"""

__version__ = "0.1.0"
