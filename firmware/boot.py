# LMS Core firmware: runs first after every power-on and reset. Nothing slow here: a
# board that cannot reach its network must still reach the REPL; main.py does the work.
import gc

gc.collect()
