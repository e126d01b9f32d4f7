"""ESP32 firmware (MicroPython), runnable on CPython for tests and simulation.

Arrives with the simulated demo devices (`lms up --demo`); the ingestion backbone is tested
with real MQTT clients on provisioned credentials (tests/harness.py ``Device``).
"""
