"""
The webhook package's one logger.  Its namespace stays
C{proxy_app.webhook}, whichever module of the package writes, so that log
filters written for the module it grew from keep working.
"""

from twisted.logger import Logger

log = Logger(namespace="proxy_app.webhook")
