"""cardswitch.crypto"""
