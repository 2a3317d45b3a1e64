"""Moving flows and guests between relays: TCP_REPAIR documents, live handover.
"""
