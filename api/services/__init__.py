"""The API's service layer: one module per resource, holding its SQL and broker calls.

Controllers get a service by dependency injection (``api.deps``), call one method and
return its typed result; services raise domain errors (``lms_core.errors`` and
``api.services.errors``), which ``api.errors`` alone turns into HTTP answers.
"""
