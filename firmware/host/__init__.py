"""Stand-ins for what only MicroPython has, so the firmware runs unmodified on CPython.

``python firmware/host/run.py BOARD_DIR`` runs ``boot.py`` then ``main.py`` with this folder
and ``firmware/`` on the module path, in ``BOARD_DIR`` (the board's filesystem: the
``lms_config.json`` the platform wrote, and what the firmware saves). Each stand-in does
what the board's module does, on the host's means, and nothing more:

=============  ==========================================================================
``utime``      MicroPython's time: ``ticks_ms``/``ticks_diff``/``ticks_add`` (wrapping at
               2**30 like the ESP32's), ``sleep_ms``, ``time_ns`` (epoch 1970, like the
               host's clock)
``usocket``    a socket with MicroPython's stream methods: ``read`` returns None when a
               non-blocking socket has nothing, ``write`` returns the bytes taken
``machine``    ``Pin`` (remembers its level), ``WDT`` (a thread: a missed feed resets),
               ``reset`` (re-executes the runner: RAM cleared, files kept), ``I2C`` (no
               device answers), ``unique_id``
``network``    a ``WLAN`` whose station is up once asked to connect (the host's network)
``ntptime``    ``settime`` that does nothing: the host's clock is already set by NTP
``esp32``      ``mcu_temperature`` from the host's thermal zone, else a steady 45 degC
``dht``        a DHT22 that never answers (OSError, as on a board with nothing wired)
=============  ==========================================================================
"""
