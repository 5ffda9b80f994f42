"""cardswitch.routing"""
