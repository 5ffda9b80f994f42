"""cardswitch.switch"""
