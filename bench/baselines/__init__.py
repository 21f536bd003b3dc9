"""What Rower is measured against: nginx, HAProxy and an ideal central dispatcher."""
