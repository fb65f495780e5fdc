"""``manage.py dmb``: see dmb.management.commands.dmb."""
