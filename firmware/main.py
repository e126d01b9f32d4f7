# LMS Core firmware: runs after boot.py. Press Ctrl-C in the REPL (mpremote) to stop it.
import lms_device

lms_device.main()
