"""Errors of the shared core. The API and CLI translate these at their boundaries.

    LmsError
    ├── SettingsError          a setting is missing or invalid
    ├── StorageError           the database failed (lower-level asyncpg errors mapped here)
    │   ├── DatabaseUnavailable    cannot connect / connection lost
    │   └── MigrationError         a migration failed or an applied file changed
    ├── BrokerError            the broker refused or did not answer
    │   ├── BrokerUnavailable      cannot connect
    │   └── DeliveryUnknown        a publish was handed over but not acknowledged: it may
    │                              still be delivered (the caller must not say it was not)
    ├── NotFound               an organization or device does not exist
    ├── AlreadyExists          a slug is taken
    └── InvalidInput           a slug, name or argument is malformed
"""


class LmsError(Exception):
    """Base of every error the platform raises on purpose."""


class SettingsError(LmsError):
    pass


class StorageError(LmsError):
    pass


class DatabaseUnavailable(StorageError):
    pass


class MigrationError(StorageError):
    pass


class BrokerError(LmsError):
    pass


class BrokerUnavailable(BrokerError):
    pass


class DeliveryUnknown(BrokerError):
    """A QoS 1 publish went out but its acknowledgement did not come (timeout, connection
    lost): a broker that was only slow still delivers it, and paho sends it again after
    reconnecting. Not a refusal: whoever records the outcome must allow that it arrives."""


class NotFound(LmsError):
    pass


class AlreadyExists(LmsError):
    pass


class InvalidInput(LmsError):
    pass
