"""The project's lab: private Docker engines, the project's services run as users run them, and a
Prometheus + Alertmanager stack on the shipped deploy/ files. Used by the tests and by scripts/demo;
not part of the installed package."""
