from flask import Flask, request, jsonify
from pprint import pprint
app = Flask(__name__)
@app.route('/webhook/<string:key>', methods=['POST'])
def webhook(key: str):
    # some code to check `key` string secret
    # Process the incoming JSON payload
    payload = request.json
    # Replace the below line with your processing logic
    print(f"Received payload:")
    pprint(payload)
    try:
        if payload["action"] == "access-request":
            result = "accept"
            # sample reject IPv6
            if "2001:67c:68::76" in payload['details']['session']:
                result = "reject"
            return jsonify({
                "access-response": result
            }), 200
    except KeyError as e:
        print(f'KeyError: {e}')
    return jsonify({"status": "success"}), 200
if __name__ == "__main__":
    app.run(host='0.0.0.0', port=5000)
