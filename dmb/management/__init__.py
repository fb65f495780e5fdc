"""Django management commands of dmb (``manage.py dmb ...``)."""
